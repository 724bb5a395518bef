"""Export / load: the compiled phases as a folder that loads without the HF model.

A bundle is a folder::

    manifest.json            format version, versions, backend, cache geometry, limits,
                             phase signatures, the pass report, sha256 of every file
    manifest.sha256          sha256 of the manifest's canonical JSON, and of each field
    manifest.sig             optional: ed25519 signature of the canonical manifest
    config.json              the HF model config (JSON)
    generation_config.json   the HF generation config (JSON)
    tokenizer files          when a tokenizer was given or found next to the model
    prefill.* / decode.*     the engines: .onnx (onnxruntime), .pt2 (inductor AOT
                             package), .engine (tensorrt)

Trust model. The sha256 hashes give integrity: a file, or a manifest field, changed
since export is caught and named. They do not give authenticity: whoever can write the
folder can write new hashes too. Only a signature (``export(sign=KEY)``,
``load(public_key=...)``) says who made a bundle. Native code (the shared library in an
AOTInductor ``.pt2``, TensorRT engines) runs inside the loading process, so such bundles
load only with ``trust_native_code=True``; ONNX bundles are data and load without it.

Loading, before it opens any file the manifest names, checks: the manifest is a JSON
object of this format and version; it matches ``manifest.sha256``; the signature, when
a public key is given; the schema (types, ranges, known keys, plain relative paths
inside the folder); the phase signatures against the cache geometry; the torch version
(inductor); consent to native code. Then: the folder holds exactly the listed files, as
regular files (no symbolic links), with their sizes and sha256; the limits against
config.json; and, once an engine is open, the inputs it declares against the manifest. It never unpickles: no ``pickle``, no ``torch.load``;
configs come from JSON through transformers' config classes (no remote code).
"""

from __future__ import annotations

import glob
import hashlib
import importlib
import json
import logging
import os
import re
import shutil
import stat
import tempfile
import time
import uuid
from pathlib import Path

import torch

from . import manifest as schema
from .backends import backend_class, exportable_backends
from .capture import CacheGeometry, LayerGeometry
from .config import CacheConfig, PassConfig
from .executor import StepExecutor
from .kv_cache import ContiguousKV, PagedKV
from .manifest import FORMAT, FORMAT_VERSION
from .passes.bf16_matmuls import has_bf16_matmuls
from .phase import PassContext, PhaseSignature
from .runtime import OptimizedModel, Runner

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
DIGEST = "manifest.sha256"
SIGNATURE = "manifest.sig"
# The files a bundle holds besides the ones its manifest lists and hashes.
OWN_FILES = (MANIFEST, DIGEST, SIGNATURE)
# The phases a bundle carries: extend (new tokens after a cached prefix) when the model
# was optimized with prefix caching; a bundle without it loads with prefix caching off.
BUNDLE_PHASES = ("prefill", "decode", "extend")
# A manifest is a few KB (the pass report is most of it); a larger file is not one.
MAX_MANIFEST_BYTES = 16 << 20

# Work folders beside the bundle: ".NAME-PID-RANDOM.pdc-tmp" while an export writes,
# ".NAME-PID-RANDOM.pdc-old" for the replaced bundle between its two renames.
TMP_SUFFIX = ".pdc-tmp"
OLD_SUFFIX = ".pdc-old"


class BundleError(ValueError):
    """A bundle is missing, corrupted, modified, malformed, untrusted, or was made by an
    incompatible version."""


def _sha256_file(f) -> str:
    h = hashlib.sha256()
    for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
    return h.hexdigest()


def _versions() -> dict:
    from . import __version__

    out = {"pdcompile": __version__, "torch": torch.__version__}
    for mod in ("transformers", "onnxruntime", "onnx", "torch_tensorrt"):
        try:
            out[mod] = importlib.import_module(mod).__version__
        except ImportError:
            pass
    return out


def _backend(name: str, options=None):
    """The backend that writes / reads this bundle's engines (one registry: pdcompile.backends)."""
    backend = backend_class(name)
    if not backend.exportable:
        raise ValueError(
            f"backend {name!r} cannot be exported: engines exist for {', '.join(exportable_backends())} "
            "(the eager backend runs Python graphs and has no engine file)"
        )
    return backend(options)


def native_code(backend: str) -> bool:
    """Whether ``backend``'s bundles hold native code (loading needs ``trust_native_code=True``)."""
    return backend_class(backend).native_code


def _expected_signature(phase: str, manifest: dict) -> PhaseSignature:
    """The signature a phase of this cache geometry has (what capture and the paged pass make)."""
    cache = manifest["cache"]
    sig = PhaseSignature.contiguous(phase, _geometry(manifest))
    return sig.paged(cache["block_size"]) if cache["paged"] else sig


def export(model, path, backend: str = "onnxruntime", tokenizer=None, overwrite: bool = False, sign=None) -> Path:
    """Write ``model`` (an :class:`OptimizedModel` from ``optimize()``) as a bundle at ``path``.

    The phases are lowered again for ``backend`` from the transformed graphs the model
    keeps, whatever backend it runs in process. The bundle is written in a hidden folder
    beside ``path`` and renamed into place when complete. ``overwrite=True`` replaces an
    existing pdcompile bundle (and refuses any other folder); the old bundle is renamed
    away before the new one is renamed in, and deleted after. Work folders left by an
    interrupted export to ``path`` are removed first. ``sign``: an ed25519 private key
    (a PEM file's path, or the key) to sign the manifest with (needs ``cryptography``).
    """
    if not isinstance(model, OptimizedModel) or (model.graphs is None and model.bundle_path is None):
        raise TypeError("export() takes the model returned by pdcompile.optimize() (it keeps the transformed graphs)")
    path = Path(path)
    key = _private_key(sign) if sign is not None else None  # a bad key fails now, not after lowering
    runner = model.runner
    options = None
    if backend == "tensorrt" and runner.paged:  # the engine's profile fixes the pool the runtime allocated
        from .backends.tensorrt import TensorRTOptions

        options = TensorRTOptions(pool_blocks=runner.kv.pool.num_blocks)
    engine = _backend(backend, options)
    bf16 = [p for p, g in (model.graphs or {}).items() if g.ctx.matmul_dtype is torch.bfloat16 and has_bf16_matmuls(g.gm)]
    if bf16 and not engine.bf16_matmuls:  # before any lowering: that takes minutes
        raise ValueError(f"the {', '.join(bf16)} graphs compute their linear layers in bfloat16 (prefill_dtype), "
                         f"which the {backend} backend has no kernels for; export a model optimized with "
                         f"prefill_dtype='float32', or export it for the inductor backend")
    path.parent.mkdir(parents=True, exist_ok=True)
    _clean_interrupted(path)
    _check_replaceable(path, overwrite)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}-{os.getpid()}-", suffix=TMP_SUFFIX))
    try:
        phases = {}
        if model.graphs is None:  # served from the compile cache: its engines are already files
            phases = _copy_engines(model, backend, tmp)
        for phase in BUNDLE_PHASES:
            if phase in phases or phase not in (model.graphs or {}):
                continue
            t0 = time.perf_counter()
            logger.info("export: lowering %s for %s ...", phase, backend)
            graph = model.graphs[phase]
            phases[phase] = engine.save(graph.gm, graph.ctx, tmp)
            logger.info("export: %s written in %.1f s", phase, time.perf_counter() - t0)
        write_manifest(model, tmp, backend, phases, tokenizer=tokenizer or _find_tokenizer(model), key=key)
        _replace(tmp, path, overwrite)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("export: bundle written to %s", path)
    return path


def _copy_engines(model, backend: str, tmp: Path) -> dict:
    """The phase entries of the compile-cache bundle ``model`` was loaded from, files copied into ``tmp``."""
    manifest = read_manifest(model.bundle_path)
    if manifest.get("backend") != backend:
        raise ValueError(
            f"this model was served from the compile cache with {manifest.get('backend')} engines and keeps no graphs "
            f"to lower for {backend}: export(backend={manifest.get('backend')!r}), or optimize(model, cache=False) "
            "and export that")
    verify(model.bundle_path, manifest)  # the copy is of the files the manifest hashed
    phases = {}
    for phase, entry in manifest["phases"].items():
        for rel in entry["files"]:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(model.bundle_path / rel, tmp / rel)
        phases[phase] = {k: v for k, v in entry.items() if k != "signature"}
    return phases


def write_manifest(model, folder: Path, backend: str, phases: dict, tokenizer=None, key=None) -> None:
    """Complete the bundle in ``folder``, which holds the engines ``phases`` names: the HF
    configs, the tokenizer, the manifest of every file with its sha256, the digest and the
    signature (``key``)."""
    runner = model.runner
    phases = {p: {**entry, "signature": model.runner.executor.phases[p][1].to_dict()} for p, entry in phases.items()}
    model.config.to_json_file(folder / "config.json")
    model.generation_config.to_json_file(folder / "generation_config.json")
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "versions": _versions(),
        "backend": backend,
        "device": str(runner.device),
        "model": {"architecture": (model.config.architectures or [None])[0], "model_type": model.config.model_type},
        "limits": {"max_batch_size": runner.max_batch_size, "max_seq_len": runner.max_seq_len,
                   "vocab_size": runner.vocab_size},
        "cache": {"dtype": str(runner.geometry.dtype).replace("torch.", ""),
                  "layers": [vars(g) for g in runner.geometry.layers],
                  "paged": runner.paged, "block_size": getattr(runner.kv, "block_size", None)},
        "phases": phases,
        "report": model.pdcompile_report().to_dict() if model.pdcompile_report() else None,
        "files": {},
    }
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        with open(f, "rb") as fh:
            manifest["files"][f.relative_to(folder).as_posix()] = {"sha256": _sha256_file(fh), "bytes": f.stat().st_size}
    # what is hashed and signed is the manifest as it will be read back
    manifest = json.loads(json.dumps(manifest, default=str))
    problems = schema.validate(manifest)
    if problems:  # a bundle this pdcompile would refuse to load is a bug here, not the user's
        raise RuntimeError("export built an invalid manifest:\n  " + "\n  ".join(problems))
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))
    (folder / DIGEST).write_text(json.dumps(schema.digest(manifest), indent=1))
    if key is not None:
        (folder / SIGNATURE).write_bytes(key.sign(schema.canonical(manifest)))


def _find_tokenizer(model):
    src = getattr(model.config, "_name_or_path", None)
    if not src or not Path(src).is_dir():
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(src)
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------- replacing a bundle

def _why_not_replaceable(path: Path) -> str | None:
    """``None`` when ``path`` is a pdcompile bundle export may replace, else why not.

    It must be a real folder with a manifest of this format, holding nothing but the
    files that manifest lists: a user's own file put in there is never deleted.
    """
    if path.is_symlink():
        return "it is a symbolic link"
    if not path.is_dir():
        return "it is not a folder"
    try:
        manifest = read_manifest(path)
    except BundleError as e:
        return f"it is not a pdcompile bundle ({e})"
    files = manifest.get("files")
    listed = set(files) if isinstance(files, dict) else set()
    for root, dirs, names in os.walk(path):
        for name in dirs + names:
            full = Path(root) / name
            rel = full.relative_to(path).as_posix()
            if full.is_symlink() or (not full.is_dir() and rel not in listed and rel not in OWN_FILES):
                return f"it holds {rel}, which is not one of the bundle's files"
    return None


def _check_replaceable(path: Path, overwrite: bool) -> None:
    if not (path.exists() or path.is_symlink()):
        return
    if not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    why = _why_not_replaceable(path)
    if why:
        raise FileExistsError(f"export refuses to replace {path}: {why}. overwrite=True replaces pdcompile "
                              "bundles only; move or remove it yourself, or choose another path")


def _replace(tmp: Path, path: Path, overwrite: bool) -> None:
    """Rename the finished bundle ``tmp`` to ``path``; an old bundle there is renamed away
    first and deleted last, so at every moment one complete bundle exists on disk."""
    _check_replaceable(path, overwrite)  # again: the lowering took minutes
    if not (path.exists() or path.is_symlink()):
        tmp.rename(path)
        return
    old = path.parent / f".{path.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}{OLD_SUFFIX}"
    path.rename(old)
    try:
        tmp.rename(path)
    except BaseException:
        old.rename(path)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _running(pid: int) -> bool:
    if os.name != "posix":  # no harmless liveness probe (os.kill would terminate it): assume running
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_interrupted(path: Path) -> None:
    """Remove the work folders an export to ``path`` killed midway left beside it.

    A ``.pdc-tmp`` folder is a half-written bundle: deleted. A ``.pdc-old`` folder is a
    complete bundle a replace had renamed away: put back when ``path`` is missing (the
    kill came between the two renames), deleted otherwise. Folders of a process that is
    still running (another export to the same path) are left alone.
    """
    pattern = re.compile(re.escape(f".{path.name}-") + r"([0-9]+)-[A-Za-z0-9_]+(" + re.escape(TMP_SUFFIX) + "|"
                         + re.escape(OLD_SUFFIX) + ")")
    found = []
    for entry in path.parent.glob(glob.escape(f".{path.name}-") + "*"):
        m = pattern.fullmatch(entry.name)
        if m and entry.is_dir() and not entry.is_symlink() and not _running(int(m.group(1))):
            found.append((m.group(2), entry))
    for kind, entry in sorted(found, key=lambda e: e[1].stat().st_mtime, reverse=True):
        if kind == OLD_SUFFIX and not (path.exists() or path.is_symlink()):
            logger.warning("export: restoring %s, which an interrupted export had renamed to %s", path, entry.name)
            entry.rename(path)
        else:
            logger.info("export: removing %s left by an interrupted export", entry)
            shutil.rmtree(entry, ignore_errors=True)


# ---------------------------------------------------------------------------- signatures

def _crypto():
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError as e:
        raise ImportError("signing and verifying bundles needs cryptography: pip install 'pdcompile[sign]'") from e
    return serialization, ed25519


def _key_bytes(key) -> bytes:
    return Path(key).read_bytes() if isinstance(key, (str, os.PathLike)) else bytes(key)


def _private_key(key):
    """An ed25519 private key from the key, a PEM file's path, or PEM bytes."""
    serialization, ed25519 = _crypto()
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        key = serialization.load_pem_private_key(_key_bytes(key), password=None)
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ValueError(f"bundles are signed with ed25519 keys, not {type(key).__name__}")
    return key


def _public_key(key):
    """An ed25519 public key from the key, a PEM or OpenSSH file's path, or their bytes."""
    serialization, ed25519 = _crypto()
    if not isinstance(key, ed25519.Ed25519PublicKey):
        data = _key_bytes(key)
        key = (serialization.load_ssh_public_key(data) if data.startswith(b"ssh-")
               else serialization.load_pem_public_key(data))
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise ValueError(f"bundles are signed with ed25519 keys, not {type(key).__name__}")
    return key


def _check_signature(path: Path, manifest: dict, public_key) -> None:
    from cryptography.exceptions import InvalidSignature

    key = _public_key(public_key)
    if not os.path.lexists(path / SIGNATURE):
        raise BundleError(f"{path} is not signed ({SIGNATURE} is missing), and a public key was given: refused")
    with _open_regular(path, SIGNATURE) as f:
        signature = f.read(1024)
    try:
        key.verify(signature, schema.canonical(manifest))
    except InvalidSignature:
        raise BundleError(f"{SIGNATURE} does not verify with the given public key: the bundle was changed after it "
                          "was signed, or signed with another key") from None


# ---------------------------------------------------------------------------- checks

def _open_regular(folder: Path, rel: str):
    """``rel`` opened for reading inside ``folder``, never through a symbolic link.

    ``rel`` must already be a plain relative path (:func:`pdcompile.manifest.plain_path`).
    """
    parts = rel.split("/")
    for i in range(1, len(parts) + 1):
        try:
            st = os.lstat(folder.joinpath(*parts[:i]))
        except (FileNotFoundError, NotADirectoryError):
            raise BundleError(f"bundle file {rel} is missing from {folder}") from None
        if stat.S_ISLNK(st.st_mode):
            raise BundleError(f"bundle file {rel}: {'/'.join(parts[:i])} is a symbolic link; bundles hold regular "
                              "files and folders only")
    if not stat.S_ISREG(st.st_mode):
        raise BundleError(f"bundle file {rel} is not a regular file")
    # O_NOFOLLOW: a link swapped in after the check is not followed either
    fd = os.open(folder / rel, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0))
    return os.fdopen(fd, "rb")


def _read_json(path: Path, rel: str, limit: int | None = None):
    limit = limit or MAX_MANIFEST_BYTES
    with _open_regular(path, rel) as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise BundleError(f"{path / rel} is over {limit} bytes: too large for a {rel}")
    try:
        return schema.parse(data)
    except ValueError as e:
        raise BundleError(f"{path / rel} is corrupted (not valid JSON: {e})") from e


def read_manifest(path) -> dict:
    """The manifest, with the checks that need nothing else: a JSON object, this format,
    a supported version. Its digest and schema are checked by :func:`check`."""
    path = Path(path)
    if not os.path.lexists(path / MANIFEST):
        raise BundleError(f"{path} is not a pdcompile bundle: {MANIFEST} is missing")
    manifest = _read_json(path, MANIFEST)
    if not isinstance(manifest, dict):
        raise BundleError(f"{path / MANIFEST} is not a {FORMAT} manifest: it is a JSON "
                          f"{type(manifest).__name__}, not an object")
    if manifest.get("format") != FORMAT:
        raise BundleError(f"{path / MANIFEST} is not a {FORMAT} manifest (format={manifest.get('format')!r})")
    version = manifest.get("format_version")
    if type(version) is not int or version < 1:  # bool is an int: true is no version
        raise BundleError(f"manifest field format_version: expected an int in [1, {FORMAT_VERSION}], "
                          f"got {json.dumps(version)}")
    if version > FORMAT_VERSION:
        raise BundleError(
            f"bundle format version {version} is newer than this pdcompile supports ({FORMAT_VERSION}); upgrade pdcompile"
        )
    return manifest


def _check_digest(path: Path, manifest: dict) -> None:
    """The manifest is the one export wrote: ``manifest.sha256`` names any changed field."""
    if not os.path.lexists(path / DIGEST):
        raise BundleError(f"{path} has no {DIGEST}, so its manifest cannot be checked: export the bundle again "
                          "with this pdcompile")
    recorded = _read_json(path, DIGEST, 4 << 20)
    if not schema.is_digest(recorded):
        raise BundleError(f"{path / DIGEST} is malformed: expected {{'manifest_sha256': hex, 'fields': {{...}}}}")
    if schema.sha256_hex(schema.canonical(manifest)) == recorded["manifest_sha256"]:
        return
    changes = schema.changed_fields(manifest, recorded["fields"])
    detail = "; ".join(f"manifest field {c}" for c in changes) or f"its sha256 differs from the one in {DIGEST}"
    raise BundleError(f"{path / MANIFEST} was modified after export: {detail}. A manifest is not edited by hand; "
                      "export the bundle again")


def _check_schema(path: Path, manifest: dict) -> None:
    problems = schema.validate(manifest)
    if problems:
        raise BundleError(f"{path / MANIFEST} is invalid:\n  " + "\n  ".join(problems))


def _refuse_native_code(path: Path, manifest: dict) -> None:
    files = ", ".join(sorted({f for entry in manifest["phases"].values() for f in entry["files"]}))
    raise BundleError(
        f"{path} holds native code: its {manifest['backend']} engines ({files}) are compiled code that runs inside "
        "this process when loaded, with this process's rights. Load it only if you trust whoever built it: "
        "pdcompile.load(path, trust_native_code=True) (command line: --trust-native-code). The sha256 hashes only "
        "show the files are unchanged since export; a signature (load(..., public_key=...)) shows who exported them"
    )


def verify(path, manifest: dict) -> None:
    """The folder holds exactly the listed files and the manifest's own, all regular files
    (no symbolic links anywhere), each with its listed size and sha256."""
    path = Path(path)
    listed = manifest["files"]
    for rel in listed:  # checked by the schema already; verify() is also called on its own
        if not schema.plain_path(rel):
            raise BundleError(f"manifest field files: {rel!r} is not a plain relative path inside the bundle")
    for root, dirs, names in os.walk(path):
        for name in sorted(dirs + names):
            full = Path(root) / name
            rel = full.relative_to(path).as_posix()
            mode = os.lstat(full).st_mode
            if stat.S_ISLNK(mode):
                raise BundleError(f"bundle entry {rel} is a symbolic link; bundles hold regular files and folders only")
            if not stat.S_ISDIR(mode) and rel not in listed and rel not in OWN_FILES:
                raise BundleError(f"bundle file {rel} is not listed in the manifest: a bundle holds only the files it "
                                  "lists and hashes")
    for rel, meta in listed.items():
        with _open_regular(path, rel) as f:
            size = os.fstat(f.fileno()).st_size
            if size != meta["bytes"]:
                raise BundleError(f"bundle file {rel} has {size} bytes, the manifest says {meta['bytes']}: corrupted")
            if _sha256_file(f) != meta["sha256"]:
                raise BundleError(f"bundle file {rel} does not match its sha256 in the manifest: corrupted or modified")


def _check_versions(manifest: dict) -> None:
    built = manifest["versions"]["torch"]
    if manifest["backend"] == "inductor" and built.split("+")[0].split(".")[:2] != torch.__version__.split("+")[0].split(".")[:2]:
        raise BundleError(
            f"this inductor bundle was compiled with torch {built}; AOTInductor packages only load in the same "
            f"torch minor version (this is torch {torch.__version__})"
        )


def _first_difference(a, b, name: str) -> str:
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return next(_first_difference(x, y, f"{name}[{i}]") for i, (x, y) in enumerate(zip(a, b)) if x != y)
    if isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys():
        return next(_first_difference(a[k], b[k], f"{name}.{k}") for k in a if a[k] != b[k])
    return name


def _geometry(manifest: dict) -> CacheGeometry:
    cache = manifest["cache"]
    return CacheGeometry(layers=tuple(LayerGeometry(**g) for g in cache["layers"]), dtype=getattr(torch, cache["dtype"]))


def _check_signatures(manifest: dict) -> None:
    """The phase signatures are what the cache geometry implies (both come from export)."""
    for phase, entry in manifest["phases"].items():
        expected = _expected_signature(phase, manifest).to_dict()
        if entry["signature"] != expected:
            field = _first_difference(entry["signature"], expected, f"phases.{phase}.signature")
            raise BundleError(f"manifest field {field}: does not match the cache geometry (cache.layers, "
                              "cache.dtype, cache.paged, cache.block_size)")


def _check_limits(manifest: dict, config) -> None:
    from .api import default_max_seq_len

    limit, asked = default_max_seq_len(config), manifest["limits"]["max_seq_len"]
    if asked > limit:
        raise BundleError(f"manifest field limits.max_seq_len: {asked} exceeds the model's limit of {limit} positions "
                          "(config.json: max_position_embeddings / sliding_window)")


def _check_engine(phase: str, entry: dict, engine_phase, limits: dict) -> None:
    """The inputs an engine file itself declares (ONNX does) against the manifest's."""
    declared_io = getattr(engine_phase, "declared_io", None)
    if declared_io is None:
        return
    inputs, outputs = declared_io()
    name, file = f"phases.{phase}", entry["files"][0]
    declared = entry["signature"]["inputs"]
    want = [i["name"] for i in declared]
    if [i["name"] for i in inputs] != want:
        raise BundleError(f"manifest field {name}.signature.inputs: {want} but {file} takes "
                          f"{[i['name'] for i in inputs]}")
    for i, (w, h) in enumerate(zip(declared, inputs)):
        dims_differ = len(w["shape"]) != len(h["shape"]) or any(
            type(a) is int and type(b) is int and a != b for a, b in zip(w["shape"], h["shape"]))
        if w["dtype"] != h["dtype"] or dims_differ:
            raise BundleError(
                f"manifest field {name}.signature.inputs[{i}] ({w['name']}): {w['dtype']} {w['shape']}, but {file} declares "
                f"{h['dtype']} {h['shape']}: the manifest does not describe this engine (cache.layers, cache.dtype, "
                "cache.block_size)")
    vocab = outputs[0]["shape"][-1] if outputs and outputs[0]["shape"] else None
    if type(vocab) is int and vocab != limits["vocab_size"]:
        raise BundleError(f"manifest field limits.vocab_size: {limits['vocab_size']}, but {file} returns logits over "
                          f"{vocab} tokens")


def _checked(path: Path, public_key, trust_native_code: bool):
    """The manifest and the backend's engine module, after every check that opens no
    engine file, in the order the module docstring gives."""
    manifest = read_manifest(path)
    _check_digest(path, manifest)
    if public_key is not None:
        _check_signature(path, manifest, public_key)
    elif os.path.lexists(path / SIGNATURE):
        logger.info("%s is signed; pass public_key= to load() to verify who signed it", path)
    _check_schema(path, manifest)
    _check_signatures(manifest)
    _check_versions(manifest)
    engine = _backend(manifest["backend"])
    if engine.native_code and not trust_native_code:
        _refuse_native_code(path, manifest)
    verify(path, manifest)  # the first check that reads a file the manifest names
    return manifest, engine


def check(path, public_key=None) -> dict:
    """Every check :func:`load` makes before it opens an engine; returns the manifest.

    Runs nothing from the bundle, so it needs no ``trust_native_code``.
    """
    return _checked(Path(path), public_key, trust_native_code=True)[0]


def load_phases(path: Path, manifest: dict, engine, cc: CacheConfig, device) -> dict:
    """{phase: (callable, signature)} of a checked bundle's engines, each checked against the manifest."""
    phases = {}
    for p, entry in manifest["phases"].items():
        ctx = PassContext(phase=p, signature=PhaseSignature.from_dict(entry["signature"]), cache=cc,
                          passes=PassConfig(), device=device)
        try:
            phases[p] = (engine.load(path, entry, ctx), ctx.signature)
        except ImportError:
            raise
        except Exception as e:  # the file is the one exported (hashes), but its runtime refuses it
            raise BundleError(f"the {p} engine {entry['files'][0]} does not load with {manifest['backend']}: "
                              f"{type(e).__name__}: {e}") from e
        _check_engine(p, entry, phases[p][0], manifest["limits"])
    return phases


def load(path, device: str | torch.device | None = None, kv_cache_memory: int | None = None, *,
         trust_native_code: bool = False, public_key=None) -> OptimizedModel:
    """Load a bundle written by :func:`export` as an :class:`OptimizedModel`.

    Bundles carry the prefill and decode engines, and the extend engine when the model was
    optimized with prefix caching (on by default); without it prefix caching is off for the
    loaded model. ``kv_cache_memory`` sizes the paged KV pool.
    ``trust_native_code``: needed for bundles whose engines are native code (inductor,
    tensorrt), which runs in this process. ``public_key``: an ed25519 public key (PEM or
    OpenSSH file path, bytes, or key) the bundle's signature must verify with.
    Every problem with the bundle raises :class:`BundleError` saying what.
    """
    from transformers import AutoConfig, GenerationConfig

    from .report import OptimizeReport

    path = Path(path)
    manifest, engine = _checked(path, public_key, trust_native_code)
    backend = manifest["backend"]
    device = torch.device(device or manifest["device"])
    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    gen_config = GenerationConfig.from_pretrained(path)
    _check_limits(manifest, config)
    try:
        report = OptimizeReport.from_dict(manifest["report"]) if manifest["report"] else OptimizeReport(backend)
    except (TypeError, KeyError, ValueError) as e:
        raise BundleError(f"manifest field report: not a pass report ({type(e).__name__}: {e})") from e
    cache, limits = manifest["cache"], manifest["limits"]
    geometry = _geometry(manifest)
    cc = CacheConfig(max_batch_size=limits["max_batch_size"], max_seq_len=limits["max_seq_len"],
                     paged=cache["paged"], block_size=cache["block_size"] or 16,
                     prefix_cache=cache["paged"] and "extend" in manifest["phases"], kv_cache_memory=kv_cache_memory)
    phases = load_phases(path, manifest, engine, cc, device)
    if cc.paged:
        from .api import default_pool_blocks

        kv = PagedKV(geometry, device, cc.max_seq_len, block_size=cc.block_size, prefix_cache=cc.prefix_cache,
                     num_blocks=default_pool_blocks(geometry, cc, cc.max_seq_len))
    else:
        kv = ContiguousKV(geometry, device, cc.max_seq_len)
    runner = Runner(kv, StepExecutor(phases), cc.max_batch_size, limits["vocab_size"])
    return OptimizedModel(runner, config, gen_config, original_model=None, report=report, backend=backend)
