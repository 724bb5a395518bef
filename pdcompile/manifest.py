"""A bundle's manifest: strict JSON parsing, its digest, its schema, its path rule.

Everything here works on the manifest's JSON alone and touches no other file, so the
loader can reject a bad manifest before it opens anything the manifest names.

* :func:`parse` reads JSON strictly: no NaN/Infinity, no duplicate keys (two values for
  one field would leave it to the parser which one counts).
* :func:`digest` hashes the canonical JSON (sorted keys, no spaces) of the whole
  manifest and of each field; ``manifest.sha256`` keeps it, so an edited manifest is
  caught and :func:`changed_fields` can say which field was edited.
* :func:`validate` checks every field's type, range and the set of known keys, and
  returns one message per problem, naming the field.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Callable

from .phase import PHASES as PHASE_SPECS
from .phase import Role

FORMAT = "pdcompile-bundle"
FORMAT_VERSION = 2  # 2: an optional extend phase
BACKENDS = ("onnxruntime", "inductor", "tensorrt")  # those with engine files (backends.exportable_backends())
ROLES = tuple(r.value for r in Role)
PHASES = tuple(PHASE_SPECS)
DTYPES = ("float32", "float16", "bfloat16")


def canonical(value) -> bytes:
    """The one byte string a JSON value hashes and signs as."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _no_duplicates(pairs):
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {key!r} appears twice in one object")
        out[key] = value
    return out


def _no_constant(name):
    raise ValueError(f"{name} is not a JSON number")


def parse(data: bytes):
    """JSON from bytes; ValueError (with the reason) for anything that is not plain JSON."""
    try:
        return json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"not UTF-8 ({e})") from None


# ---------------------------------------------------------------------------- digest

# Fields are hashed three levels deep ("limits.max_seq_len", "phases.decode.files"):
# enough to name what was edited without listing every entry of the pass report.
_DIGEST_DEPTH = 3


def fields(value, prefix: str = "", depth: int = _DIGEST_DEPTH) -> dict[str, object]:
    """``{"limits.max_seq_len": 256, ...}``: the value of each field, ``depth`` levels deep."""
    if isinstance(value, dict) and value and depth > 0:
        out = {}
        for key, sub in value.items():
            out.update(fields(sub, f"{prefix}.{key}" if prefix else str(key), depth - 1))
        return out
    return {prefix or "(whole manifest)": value}


def digest(manifest) -> dict:
    """What ``manifest.sha256`` holds: the manifest's sha256 and each field's."""
    return {"manifest_sha256": sha256_hex(canonical(manifest)),
            "fields": {name: sha256_hex(canonical(v)) for name, v in fields(manifest).items()}}


def changed_fields(manifest, recorded: dict) -> list[str]:
    """Which fields differ from the ones ``recorded`` (a digest's ``fields``) hashes."""
    now = {name: sha256_hex(canonical(v)) for name, v in fields(manifest).items()}
    out = [f"{name} was changed" for name in sorted(now.keys() & recorded.keys()) if now[name] != recorded[name]]
    out += [f"{name} was added" for name in sorted(now.keys() - recorded.keys())]
    out += [f"{name} was removed" for name in sorted(recorded.keys() - now.keys())]
    return out


def is_digest(value) -> bool:
    return (isinstance(value, dict) and set(value) == {"manifest_sha256", "fields"} and is_hex64(value["manifest_sha256"])
            and isinstance(value["fields"], dict) and all(isinstance(v, str) for v in value["fields"].values()))


def is_hex64(value) -> bool:
    return isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value) is not None


# ---------------------------------------------------------------------------- paths

def plain_path(rel) -> bool:
    """A path the bundle may name: relative, inside the folder, ``/``-separated.

    No ``..``, ``.`` or empty parts, no leading ``/``, no backslash (a separator on
    Windows), no ``:`` (drive letters, NTFS streams), no control characters. Judged on
    the string alone, before the file system is asked anything: whether a file outside
    the bundle exists is never revealed.
    """
    if not isinstance(rel, str) or not rel or len(rel) > 255 or rel.startswith("/"):
        return False
    if any(c in rel for c in "\\:") or any(ord(c) < 32 for c in rel):
        return False
    return all(part not in ("", ".", "..") for part in rel.split("/"))


# ---------------------------------------------------------------------------- schema


@dataclass(frozen=True)
class Leaf:
    """A value: ``test`` says whether it is acceptable, ``expected`` says what would be."""

    expected: str
    test: Callable[[object], bool]


@dataclass(frozen=True)
class ListOf:
    item: object
    min_len: int = 0


@dataclass(frozen=True)
class MapOf:
    """An object whose keys are not fixed (file names, version names)."""

    key: Leaf
    value: object


@dataclass(frozen=True)
class OptionalKey:
    """In an object's spec: the key may be absent."""

    spec: object


@dataclass(frozen=True)
class Nullable:
    spec: object


def integer(lo: int) -> Leaf:
    # bool is an int subclass: true must not pass for 1
    return Leaf(f"int >= {lo}", lambda v: type(v) is int and v >= lo)


def one_of(*values) -> Leaf:
    return Leaf(f"one of {', '.join(map(repr, values))}", lambda v: isinstance(v, str) and v in values)


STRING = Leaf("string", lambda v: isinstance(v, str))
BOOL = Leaf("bool", lambda v: type(v) is bool)
NUMBER = Leaf("number", lambda v: type(v) in (int, float))
OBJECT = Leaf("object", lambda v: isinstance(v, dict))
PATH = Leaf("a plain relative path inside the bundle (no '..', no absolute path)", plain_path)
HEX64 = Leaf("64 lowercase hex digits", is_hex64)
DIM = Leaf("int >= 0 or a dimension name", lambda v: (type(v) is int and v >= 0) or isinstance(v, str))
DEVICE = Leaf("a device such as 'cpu' or 'cuda:0'",
              lambda v: isinstance(v, str) and re.fullmatch(r"(cpu|cuda|xpu|mps)(:[0-9]+)?", v) is not None)

TENSOR = {"name": STRING, "role": one_of(*ROLES), "dtype": STRING, "shape": ListOf(DIM),
          # paged inputs of sliding-window layers: their window (absent: full attention)
          "window": OptionalKey(integer(1))}
PHASE = {
    "files": ListOf(PATH, min_len=1),
    # the phase's PhaseSignature (pdcompile/phase.py): what the engine takes and returns, by role
    "signature": {"phase": one_of(*PHASES), "inputs": ListOf(TENSOR, min_len=1), "outputs": ListOf(TENSOR, min_len=1)},
    # tensorrt: the tensor names read back from the engine
    "engine_inputs": OptionalKey(ListOf(STRING)),
    "engine_outputs": OptionalKey(ListOf(STRING)),
}
SCHEMA = {
    "format": one_of(FORMAT),
    "format_version": Leaf(f"int in [1, {FORMAT_VERSION}]", lambda v: type(v) is int and 1 <= v <= FORMAT_VERSION),
    "versions": MapOf(STRING, STRING),
    "backend": one_of(*BACKENDS),
    "device": DEVICE,
    "model": {"architecture": Nullable(STRING), "model_type": STRING},
    "limits": {"max_batch_size": integer(1), "max_seq_len": integer(2), "vocab_size": integer(1)},
    "cache": {
        "dtype": one_of(*DTYPES),
        "layers": ListOf({"kv_heads": integer(1), "head_dim": integer(1), "v_head_dim": integer(1),
                           "window": OptionalKey(integer(0))}, min_len=1),
        "paged": BOOL,
        "block_size": Nullable(integer(1)),
    },
    "phases": {"prefill": PHASE, "decode": PHASE, "extend": OptionalKey(PHASE)},
    # informational (what optimize() did); loaded into an OptimizeReport
    "report": Nullable({"backend": STRING, "shape": MapOf(STRING, NUMBER), "timings_s": MapOf(STRING, NUMBER),
                        "phases": MapOf(STRING, ListOf(OBJECT))}),
    "files": MapOf(PATH, {"sha256": HEX64, "bytes": integer(0)}),
}


def _show(value) -> str:
    text = json.dumps(value) if not isinstance(value, (bytes, bytearray)) else repr(value)
    return text if len(text) <= 200 else text[:197] + "..."


def _check(value, spec, name: str, problems: list[str]) -> None:
    where = f"manifest field {name}" if name else "manifest"
    if isinstance(spec, Nullable):
        if value is not None:
            _check(value, spec.spec, name, problems)
    elif isinstance(spec, dict):
        if not isinstance(value, dict):
            problems.append(f"{where}: expected an object, got {_show(value)}")
            return
        for key in value:
            if key not in spec:
                problems.append(f"manifest field {_join(name, key)}: unknown key")
        for key, sub in spec.items():
            optional = isinstance(sub, OptionalKey)
            if key in value:
                _check(value[key], sub.spec if optional else sub, _join(name, key), problems)
            elif not optional:
                problems.append(f"manifest field {_join(name, key)}: missing")
    elif isinstance(spec, ListOf):
        if not isinstance(value, list):
            problems.append(f"{where}: expected a list, got {_show(value)}")
            return
        if len(value) < spec.min_len:
            problems.append(f"{where}: expected at least {spec.min_len} entries, got {len(value)}")
        for i, item in enumerate(value):
            _check(item, spec.item, f"{name}[{i}]", problems)
    elif isinstance(spec, MapOf):
        if not isinstance(value, dict):
            problems.append(f"{where}: expected an object, got {_show(value)}")
            return
        for key, item in value.items():
            if not spec.key.test(key):
                problems.append(f"{where}: key {_show(key)} is not {spec.key.expected}")
            else:
                _check(item, spec.value, _join(name, key), problems)
    elif not spec.test(value):
        problems.append(f"{where}: expected {spec.expected}, got {_show(value)}")


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def validate(manifest) -> list[str]:
    """Every problem of ``manifest``, one message each naming the field; [] when valid.

    Types, ranges and known keys first; then what holds between fields (a phase's files
    are among the hashed files, paging and block size agree, ``versions`` has torch's).
    """
    problems: list[str] = []
    _check(manifest, SCHEMA, "", problems)
    if problems:
        return problems
    for phase, entry in manifest["phases"].items():
        for i, rel in enumerate(entry["files"]):
            if rel not in manifest["files"]:
                problems.append(f"manifest field phases.{phase}.files[{i}]: {rel!r} is not listed (and hashed) "
                                "in files")
    cache = manifest["cache"]
    if cache["paged"] and cache["block_size"] is None:
        problems.append("manifest field cache.block_size: a paged cache needs an int >= 1, got null")
    if not cache["paged"] and cache["block_size"] is not None:
        problems.append(f"manifest field cache.block_size: expected null for a contiguous cache, got {cache['block_size']}")
    if "torch" not in manifest["versions"]:
        problems.append("manifest field versions.torch: missing")
    return problems
