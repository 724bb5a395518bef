"""Malformed and hostile bundles, native code by consent, signatures, safe overwrite.

Each case of the corpus edits a copy of one small ONNX bundle (exported once for the
module) and must raise a BundleError naming what is wrong, without reading anything
outside the bundle or writing anything anywhere. Cases marked "tampered" edit only
manifest.json (the digest in manifest.sha256 catches them and names the field); the
others are "forged": the manifest is written back with a fresh digest, as anyone who can
write the folder could, so the schema, the path rule and the cross-checks must stop them.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch

import hostile
import models
import pdcompile
from conftest import optimized
from pdcompile import BundleError
from pdcompile import bundle as bundle_mod

# Every file a test process opens while the flag is set: audit hooks see Python's open()
# and os.open(), which is how the loader reads a bundle up to the engine runtimes.
_OPENED: list[str] | None = None


def _audit(event, args):
    if _OPENED is not None and event in ("open", "os.listdir", "os.scandir") and args and \
            isinstance(args[0], (str, bytes, os.PathLike)):
        _OPENED.append(os.path.realpath(os.fsdecode(args[0])))


sys.addaudithook(_audit)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    _, fast = optimized("llama", "eager")
    path = tmp_path_factory.mktemp("trust") / "tiny.pdc"
    pdcompile.export(fast, path, backend="onnxruntime", tokenizer=models.word_tokenizer())
    return path


@pytest.fixture(scope="module")
def hostile_so(tmp_path_factory):
    return hostile.library(tmp_path_factory.mktemp("hostile"))


@dataclass
class Work:
    """A copy of the bundle to edit, a folder beside it that nothing may touch, the manifest."""

    bundle: Path
    outside: Path
    manifest: dict
    so: Path | None = None
    raw: bool = False  # the edit wrote manifest.json itself


@pytest.fixture
def work(pristine, tmp_path):
    dst = tmp_path / "bundle.pdc"
    shutil.copytree(pristine, dst)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.onnx").write_bytes(b"the user's own file")
    return Work(dst, outside, json.loads((dst / "manifest.json").read_text()))


def _snapshot(root: Path) -> dict:
    out = {}
    for dirpath, dirs, names in os.walk(root):
        for name in dirs + names:
            p = Path(dirpath) / name
            st = os.lstat(p)
            out[p.relative_to(root).as_posix()] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return out


def _load_refused(w: Work, pattern: str, **kw) -> str:
    """load() raises a BundleError matching ``pattern``; it opened nothing outside the
    bundle and changed nothing on disk around it."""
    global _OPENED
    before = _snapshot(w.bundle.parent)
    _OPENED = []
    try:
        with pytest.raises(BundleError, match=pattern) as err:
            pdcompile.load(w.bundle, **kw)
    finally:
        opened, _OPENED = _OPENED, None
    outside = os.path.realpath(w.outside)
    assert not [p for p in opened if p.startswith(outside)], f"read outside the bundle: {opened}"
    assert _snapshot(w.bundle.parent) == before, "load() changed files on disk"
    return str(err.value)


def test_audit_hook_sees_reads_outside(work):
    """The guard in _load_refused is not vacuous: a read outside the bundle is recorded."""
    global _OPENED
    _OPENED = []
    try:
        (work.bundle / ".." / "outside" / "secret.onnx").read_bytes()
    finally:
        opened, _OPENED = _OPENED, None
    assert os.path.realpath(work.outside / "secret.onnx") in opened


def test_pristine_copy_loads_without_consent(work):
    """The control for the corpus: the unedited copy loads (ONNX is data: no
    trust_native_code) and generates what the model does."""
    model, _ = optimized("llama", "eager")
    m = pdcompile.load(work.bundle)
    ids, mask = models.left_padded_batch()
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(m.generate(input_ids=ids, attention_mask=mask, **kw),
                       model.generate(input_ids=ids, attention_mask=mask, **kw))


# ---------------------------------------------------------------------------- the corpus

@dataclass(frozen=True)
class Case:
    id: str
    edit: Callable[[Work], None]
    error: str  # regex the BundleError message must match
    tampered: bool = False  # manifest.json written without a fresh digest


def _set(path: str, value):
    """An edit setting the manifest field ``path`` (dotted; [i] for list items)."""

    def edit(w: Work):
        obj, keys = w.manifest, _keys(path)
        for k in keys[:-1]:
            obj = obj[k]
        obj[keys[-1]] = value

    return edit


def _drop(path: str):
    def edit(w: Work):
        obj, keys = w.manifest, _keys(path)
        for k in keys[:-1]:
            obj = obj[k]
        del obj[keys[-1]]

    return edit


def _keys(path: str):
    out = []
    for part in path.split("."):
        name, _, index = part.partition("[")
        out.append(name)
        if index:
            out.append(int(index.rstrip("]")))
    return out


def _file_field(rel: str, key: str, value):
    # not through _set: a file name has dots of its own
    return lambda w: w.manifest["files"][rel].update({key: value})


def _raw(data: bytes):
    def edit(w: Work):
        (w.bundle / "manifest.json").write_bytes(data)
        w.raw = True

    return edit


def _raw_json(make: Callable[[dict], str]):
    def edit(w: Work):
        (w.bundle / "manifest.json").write_text(make(w.manifest))
        w.raw = True

    return edit


def _engine_path(rel: str):
    """The prefill engine named ``rel`` (listed and hashed as the secret file's bytes)."""

    def edit(w: Work):
        w.manifest["phases"]["prefill"]["files"] = [rel]
        data = (w.outside / "secret.onnx").read_bytes()
        w.manifest["files"][rel] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}

    return edit


def _symlinked_engine(w: Work):
    (w.bundle / "prefill.onnx").unlink()
    (w.bundle / "prefill.onnx").symlink_to(w.outside / "secret.onnx")
    hostile.rehash(w.bundle, w.manifest, "prefill.onnx")


def _symlinked_folder(w: Work):
    (w.bundle / "sub").symlink_to(w.outside, target_is_directory=True)
    w.manifest["phases"]["prefill"]["files"] = ["sub/secret.onnx"]
    hostile.rehash(w.bundle, w.manifest, "sub/secret.onnx")


def _symlinked_manifest(w: Work):
    (w.outside / "manifest.json").write_text(json.dumps(w.manifest))
    (w.bundle / "manifest.json").unlink()
    (w.bundle / "manifest.json").symlink_to(w.outside / "manifest.json")
    w.raw = True


def _fifo_engine(w: Work):
    (w.bundle / "prefill.onnx").unlink()
    os.mkfifo(w.bundle / "prefill.onnx")  # opening it to hash it would block forever


def _unlisted_file(w: Work):
    (w.bundle / "sitecustomize.py").write_text("print('hello')\n")


def _missing_file(w: Work):
    (w.bundle / "decode.onnx").unlink()


def _truncated_engine(w: Work):
    f = w.bundle / "decode.onnx"
    f.write_bytes(f.read_bytes()[:1000])


def _block_size(w: Work):
    w.manifest["cache"]["block_size"] = 32


def _block_size_and_signatures(w: Work):
    """A consistent forgery of the manifest: only the engine itself can contradict it."""
    w.manifest["cache"]["block_size"] = 32
    for entry in w.manifest["phases"].values():
        for t in entry["signature"]["inputs"]:
            if t["role"] == "pool":
                t["shape"][1] = 32


def _native_package(w: Work):
    """Every engine (prefill, decode, extend) becomes an AOTInductor package carrying a library
    that writes a file when loaded; the manifest says inductor and lists their hashes."""
    for phase in list(w.manifest["phases"]):
        (w.bundle / f"{phase}.onnx").unlink()
        del w.manifest["files"][f"{phase}.onnx"]
        hostile.package(w.bundle / f"{phase}.pt2", phase, w.so)
        hostile.rehash(w.bundle, w.manifest, f"{phase}.pt2")
        w.manifest["phases"][phase]["files"] = [f"{phase}.pt2"]
    w.manifest["backend"] = "inductor"


def _digest_file(text: str | None):
    def edit(w: Work):
        if text is None:
            (w.bundle / "manifest.sha256").unlink()
        else:
            (w.bundle / "manifest.sha256").write_text(text)
        w.raw = True

    return edit


def _deep(w: Work):
    (w.bundle / "manifest.json").write_text('{"format": "pdcompile-bundle", "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    w.raw = True


FIELD = "manifest field"
CASES = [
    # behaviour-relevant fields edited by hand: the digest names the field
    Case("tampered-max_seq_len", _set("limits.max_seq_len", 4096), rf"{FIELD} limits.max_seq_len was changed", True),
    Case("tampered-max_batch_size", _set("limits.max_batch_size", 64), rf"{FIELD} limits.max_batch_size was changed", True),
    Case("tampered-vocab_size", _set("limits.vocab_size", 1000), rf"{FIELD} limits.vocab_size was changed", True),
    Case("tampered-block_size", _set("cache.block_size", 32), rf"{FIELD} cache.block_size was changed", True),
    Case("tampered-dtype", _set("cache.dtype", "float16"), rf"{FIELD} cache.dtype was changed", True),
    Case("tampered-layers", _set("cache.layers[0].kv_heads", 4), rf"{FIELD} cache.layers was changed", True),
    Case("tampered-paged", _set("cache.paged", False), rf"{FIELD} cache.paged was changed", True),
    Case("tampered-backend", _set("backend", "tensorrt"), rf"{FIELD} backend was changed", True),
    Case("tampered-device", _set("device", "cuda:0"), rf"{FIELD} device was changed", True),
    Case("tampered-phase-files", _set("phases.prefill.files", ["decode.onnx"]), rf"{FIELD} phases.prefill.files was changed", True),
    Case("tampered-file-hash", _file_field("decode.onnx", "sha256", "0" * 64),
         rf"{FIELD} files.decode.onnx.sha256 was changed", True),
    Case("tampered-versions-removed", _drop("versions"), rf"{FIELD} versions.torch was removed", True),
    Case("tampered-field-added", _set("limits.max_new_tokens", 10), rf"{FIELD} limits.max_new_tokens was added", True),
    Case("tampered-report", _set("report.backend", "x"), rf"{FIELD} report.backend was changed", True),
    # forged: types, ranges, known keys
    Case("max_seq_len-string", _set("limits.max_seq_len", "4096"), rf'{FIELD} limits.max_seq_len: expected int >= 2, got "4096"'),
    Case("max_batch_size-zero", _set("limits.max_batch_size", 0), rf"{FIELD} limits.max_batch_size: expected int >= 1, got 0"),
    Case("vocab_size-bool", _set("limits.vocab_size", True), rf"{FIELD} limits.vocab_size: expected int >= 1, got true"),
    Case("max_seq_len-float", _set("limits.max_seq_len", 256.0), rf"{FIELD} limits.max_seq_len: expected int >= 2, got 256.0"),
    Case("dtype-torch-attribute", _set("cache.dtype", "load"), rf"{FIELD} cache.dtype: expected one of 'float32'"),
    Case("layers-empty", _set("cache.layers", []), rf"{FIELD} cache.layers: expected at least 1 entries, got 0"),
    Case("head_dim-negative", _set("cache.layers[0].head_dim", -16), rf"{FIELD} cache.layers\[0\].head_dim: expected int >= 1"),
    Case("paged-string", _set("cache.paged", "yes"), rf'{FIELD} cache.paged: expected bool, got "yes"'),
    Case("paged-without-block_size", _set("cache.block_size", None), rf"{FIELD} cache.block_size: a paged cache needs"),
    Case("versions-missing", _drop("versions"), rf"{FIELD} versions: missing"),
    Case("phases-missing", _drop("phases"), rf"{FIELD} phases: missing"),
    Case("decode-missing", _drop("phases.decode"), rf"{FIELD} phases.decode: missing"),
    Case("limits-a-list", _set("limits", [256]), rf"{FIELD} limits: expected an object, got \[256\]"),
    Case("unknown-key", _set("run_on_load", "rm -rf /"), rf"{FIELD} run_on_load: unknown key"),
    Case("unknown-limit", _set("limits.max_prompt", 9), rf"{FIELD} limits.max_prompt: unknown key"),
    Case("backend-unknown", _set("backend", "pickle"), rf"{FIELD} backend: expected one of 'onnxruntime'"),
    Case("device-unknown", _set("device", "meta"), rf"{FIELD} device: expected a device"),
    Case("sha256-not-hex", _file_field("decode.onnx", "sha256", "xyz"),
         rf'{FIELD} files.decode.onnx.sha256: expected 64 lowercase hex digits, got "xyz"'),
    Case("bytes-negative", _file_field("decode.onnx", "bytes", -1), rf"{FIELD} files.decode.onnx.bytes: expected int >= 0"),
    Case("report-not-a-report", _set("report.phases.prefill", [{"name": "x"}]), rf"{FIELD} report: not a pass report"),
    # format and version, and manifests that are not JSON objects
    Case("format_version-0", _set("format_version", 0), rf"{FIELD} format_version: expected an int in \[1, 2\], got 0"),
    Case("format_version-negative", _set("format_version", -7), rf"{FIELD} format_version: expected an int in \[1, 2\], got -7"),
    Case("format_version-true", _set("format_version", True), rf"{FIELD} format_version: expected an int in \[1, 2\], got true"),
    Case("format_version-string", _set("format_version", "1"), rf'{FIELD} format_version: expected an int in \[1, 2\], got "1"'),
    Case("format_version-newer", _set("format_version", 3), r"format version 3 is newer than this pdcompile supports \(2\)"),
    Case("format-other", _set("format", "other"), r"is not a pdcompile-bundle manifest \(format='other'\)"),
    Case("manifest-a-list", _raw(b"[1, 2]"), r"is not a pdcompile-bundle manifest: it is a JSON list, not an object"),
    Case("manifest-truncated", _raw_json(lambda m: json.dumps(m)[:-40]), r"is corrupted \(not valid JSON"),
    Case("manifest-NaN", _raw_json(lambda m: json.dumps(m).replace('"max_seq_len": 256', '"max_seq_len": NaN')),
         r"not valid JSON: NaN is not a JSON number"),
    Case("manifest-duplicate-key", _raw_json(lambda m: json.dumps(m).replace('"max_seq_len": 256', '"max_seq_len": 256, "max_seq_len": 4096')),
         r"not valid JSON: key 'max_seq_len' appears twice"),
    Case("manifest-not-utf8", _raw(b'{"format": "\xff"}'), r"not valid JSON: not UTF-8"),
    Case("manifest-nested-deeply", _deep, r"not valid JSON: nested too deeply"),
    Case("digest-missing", _digest_file(None), r"has no manifest.sha256"),
    Case("digest-malformed", _digest_file('{"manifest_sha256": 1}'), r"manifest.sha256 is malformed"),
    # cross-checks a forger who keeps the schema still meets
    Case("block_size-vs-signature", _block_size, rf"{FIELD} phases.prefill.signature.inputs\[4\].shape\[1\]: does not match the cache geometry"),
    Case("block_size-vs-engine", _block_size_and_signatures,
         rf"{FIELD} phases.prefill.signature.inputs\[4\] \(pool_0\): float32 \['pool_blocks', 32, 2, 16\], but prefill.onnx declares"),
    Case("vocab_size-vs-engine", _set("limits.vocab_size", 1000), rf"{FIELD} limits.vocab_size: 1000, but prefill.onnx returns logits over 256"),
    Case("max_seq_len-vs-config", _set("limits.max_seq_len", 4096), rf"{FIELD} limits.max_seq_len: 4096 exceeds the model's limit of 512"),
    # paths: outside the bundle, unlisted, links, missing, not regular
    Case("path-parent", _engine_path("../outside/secret.onnx"), rf"{FIELD} files: key \"../outside/secret.onnx\" is not a plain relative path"),
    Case("path-absolute", lambda w: _engine_path(str(w.outside / "secret.onnx"))(w), rf"{FIELD} files: key \"/.*secret.onnx\" is not a plain relative path"),
    Case("path-inner-parent", _engine_path("sub/../../outside/secret.onnx"), rf"{FIELD} phases.prefill.files\[0\]: expected a plain relative path"),
    Case("path-dot", _engine_path("./prefill.onnx"), rf"{FIELD} files: key \"./prefill.onnx\" is not a plain relative path"),
    Case("path-backslash", _engine_path("..\\outside\\secret.onnx"), rf"{FIELD} files: key .* is not a plain relative path"),
    Case("phase-file-unlisted", _set("phases.prefill.files", ["other.onnx"]), rf"{FIELD} phases.prefill.files\[0\]: 'other.onnx' is not listed \(and hashed\) in files"),
    Case("symlinked-engine", _symlinked_engine, r"bundle entry prefill.onnx is a symbolic link"),
    Case("symlinked-folder", _symlinked_folder, r"bundle entry sub is a symbolic link"),
    Case("symlinked-manifest", _symlinked_manifest, r"bundle file manifest.json: manifest.json is a symbolic link"),
    Case("fifo-engine", _fifo_engine, r"bundle file prefill.onnx is not a regular file"),
    Case("unlisted-file", _unlisted_file, r"bundle file sitecustomize.py is not listed in the manifest"),
    Case("missing-file", _missing_file, r"bundle file decode.onnx is missing"),
    Case("truncated-engine", _truncated_engine, r"bundle file decode.onnx has 1000 bytes, the manifest says"),
    # native code: refused before any package is opened (more in test_hostile_native_code)
    Case("swapped-native-library", _native_package, r"holds native code: its inductor engines \(decode.pt2, extend.pt2, prefill.pt2\)"),
]


def test_corpus_is_large_and_distinct():
    assert len(CASES) >= 30
    assert len({c.id for c in CASES}) == len(CASES)
    assert all(c.error for c in CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_or_malformed_bundle_is_refused(case, work, request, monkeypatch):
    if case.edit is _native_package:
        work.so = request.getfixturevalue("hostile_so")
        monkeypatch.setenv(hostile.SENTINEL_ENV, str(work.outside / "sentinel"))
    if case.edit is _fifo_engine and not hasattr(os, "mkfifo"):
        pytest.skip("this platform has no named pipes (os.mkfifo)")
    case.edit(work)
    if case.tampered:
        (work.bundle / "manifest.json").write_text(json.dumps(work.manifest, indent=2))
    elif not work.raw:
        hostile.reseal(work.bundle, work.manifest)
    _load_refused(work, case.error)
    assert not (work.outside / "sentinel").exists()


# ---------------------------------------------------------------------------- paths reveal nothing

@pytest.mark.parametrize("where", ["../outside/{}", "{outside}/{}"])
def test_outside_paths_reveal_nothing(where, work):
    """The same error whether the outside file exists or not: paths are judged as strings."""
    messages = []
    for name in ("secret.onnx", "absent.onnx"):
        m = copy.deepcopy(work.manifest)
        rel = where.format(name, outside=work.outside)
        m["phases"]["prefill"]["files"] = [rel]
        m["files"][rel] = {"sha256": "0" * 64, "bytes": 19}
        hostile.reseal(work.bundle, m)
        messages.append(_load_refused(work, "is not a plain relative path").replace(name, "NAME"))
    assert messages[0] == messages[1]


# ---------------------------------------------------------------------------- native code

def test_hostile_native_code(work, hostile_so, monkeypatch):
    """An inductor bundle whose packages carry a library that writes a file when loaded:
    refused without consent, and no package loader is even called; with consent, the
    library runs (so the first assertion could have failed)."""
    import torch._inductor

    work.so = hostile_so
    sentinel = work.outside / "sentinel"
    monkeypatch.setenv(hostile.SENTINEL_ENV, str(sentinel))
    _native_package(work)
    hostile.reseal(work.bundle, work.manifest)
    calls = []
    real = torch._inductor.aoti_load_package
    monkeypatch.setattr(torch._inductor, "aoti_load_package", lambda *a, **k: calls.append(a) or real(*a, **k))

    msg = _load_refused(work, "holds native code")
    assert "trust_native_code=True" in msg and "--trust-native-code" in msg
    assert calls == [] and not sentinel.exists()

    with pytest.raises(BundleError, match="the prefill engine prefill.pt2 does not load with inductor"):
        pdcompile.load(work.bundle, trust_native_code=True)
    assert len(calls) == 1 and sentinel.read_text() == "native code from the bundle ran\n"


def test_unknown_backends_count_as_native():
    class Quiet(pdcompile.backends.Backend):  # a backend that does not say
        name = "quiet"

    assert Quiet().native_code is True
    # the schema knows every backend with engine files
    assert set(pdcompile.backends.exportable_backends()) == set(pdcompile.manifest.BACKENDS)
    assert bundle_mod.native_code("onnxruntime") is False
    assert bundle_mod.native_code("inductor") is True and bundle_mod.native_code("tensorrt") is True


def test_package_outputs_unwrapped():
    """An AOTInductor package exported from a graph returning [logits] gives the tensor."""
    from pdcompile.backends.inductor import PackagePhase

    t = torch.ones(2, 3)
    assert PackagePhase(lambda *a: [t])(torch.zeros(1)) is t
    assert PackagePhase(lambda *a: t)(torch.zeros(1)) is t


# ---------------------------------------------------------------------------- signatures

def _keypair(folder: Path, name: str = "key"):
    pytest.importorskip("cryptography", reason="signing needs the cryptography package (pdcompile[sign])")
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    key = ed25519.Ed25519PrivateKey.generate()
    private, public = folder / f"{name}.pem", folder / f"{name}.pub.pem"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


@pytest.fixture
def quick_export(monkeypatch):
    """export() with engines written as placeholder files: what export does around the
    lowering (manifest, digest, signature, replacing folders) in milliseconds."""
    from pdcompile.backends import onnxruntime as ort_backend

    def save(self, gm, ctx, folder):
        (Path(folder) / f"{ctx.phase}.onnx").write_bytes(f"placeholder {ctx.phase} engine".encode())
        return {"files": [f"{ctx.phase}.onnx"]}

    monkeypatch.setattr(ort_backend.OrtBackend, "save", save)
    _, fast = optimized("llama", "eager")
    return lambda path, **kw: pdcompile.export(fast, path, backend="onnxruntime", **kw)


def test_signed_bundle(quick_export, tmp_path):
    private, public = _keypair(tmp_path)
    _, other_public = _keypair(tmp_path, "other")
    path = quick_export(tmp_path / "signed.pdc", sign=private)
    manifest = bundle_mod.check(path, public_key=public)  # verifies
    assert manifest["backend"] == "onnxruntime" and (path / "manifest.sig").stat().st_size == 64
    with pytest.raises(BundleError, match="manifest.sig does not verify with the given public key"):
        bundle_mod.check(path, public_key=other_public)
    # a forged manifest with a fresh digest passes the digest, not the signature
    manifest["limits"]["max_seq_len"] = 128
    hostile.reseal(path, manifest)
    bundle_mod.check(path)
    with pytest.raises(BundleError, match="manifest.sig does not verify"):
        bundle_mod.check(path, public_key=public)
    unsigned = quick_export(tmp_path / "unsigned.pdc")
    with pytest.raises(BundleError, match=r"is not signed \(manifest.sig is missing\), and a public key was given"):
        bundle_mod.check(unsigned, public_key=public)


# ---------------------------------------------------------------------------- export's overwrite

def test_overwrite_refuses_what_is_not_a_bundle(quick_export, tmp_path, pristine):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=r"refuses to replace .*mine: it is not a pdcompile bundle"):
        quick_export(folder, overwrite=True)
    assert (folder / "precious.txt").read_text() == "keep me"

    inside = tmp_path / "bundle-with-notes.pdc"
    shutil.copytree(pristine, inside)
    (inside / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="it holds notes.txt, which is not one of the bundle's files"):
        quick_export(inside, overwrite=True)
    assert (inside / "notes.txt").exists()

    link = tmp_path / "link.pdc"
    link.symlink_to(inside, target_is_directory=True)
    with pytest.raises(FileExistsError, match="it is a symbolic link"):
        quick_export(link, overwrite=True)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_overwrite_replaces_a_bundle_by_renames(quick_export, tmp_path, pristine, monkeypatch):
    path = tmp_path / "b.pdc"
    shutil.copytree(pristine, path)
    old_hash = json.loads((path / "manifest.json").read_text())["files"]["prefill.onnx"]["sha256"]
    # the rename that brings the new bundle in fails: the old bundle is put back intact
    real_rename = Path.rename

    def failing_rename(self, target):
        if self.name.endswith(bundle_mod.TMP_SUFFIX):
            raise OSError("disk went away")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", failing_rename)
    with pytest.raises(OSError, match="disk went away"):
        quick_export(path, overwrite=True)
    monkeypatch.setattr(Path, "rename", real_rename)
    assert json.loads((path / "manifest.json").read_text())["files"]["prefill.onnx"]["sha256"] == old_hash
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    pdcompile.load(path)  # still the complete old bundle

    quick_export(path, overwrite=True)
    assert json.loads((path / "manifest.json").read_text())["files"]["prefill.onnx"]["sha256"] != old_hash
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_interrupted_export_is_cleaned_up(quick_export, tmp_path, pristine):
    path = tmp_path / "b.pdc"
    dead = _dead_pid()
    stale = tmp_path / f".b.pdc-{dead}-abc123{bundle_mod.TMP_SUFFIX}"
    stale.mkdir()
    (stale / "prefill.onnx").write_bytes(b"\0" * 4096)
    running = tmp_path / f".b.pdc-{os.getpid()}-def456{bundle_mod.TMP_SUFFIX}"  # an export still running
    running.mkdir()
    other = tmp_path / f".b.pdc-x-{dead}-abc123{bundle_mod.TMP_SUFFIX}"  # bundle "b.pdc-x"'s, not ours
    other.mkdir()
    # killed between the renames: the old bundle is beside the path, the path is missing
    moved = tmp_path / f".b.pdc-{dead}-0123abcd{bundle_mod.OLD_SUFFIX}"
    shutil.copytree(pristine, moved)

    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        quick_export(path)  # the old bundle is back, and export does not overwrite it unasked
    assert not stale.exists() and not moved.exists() and running.exists() and other.exists()
    assert (path / "manifest.json").read_bytes() == (pristine / "manifest.json").read_bytes()


# ---------------------------------------------------------------------------- command line

def test_cli_passes_consent_and_key(monkeypatch, tmp_path, capsys):
    """`pdcompile generate` hands --trust-native-code and --public-key to load(); a
    BundleError is one line on stderr and exit status 2, not a traceback."""
    from pdcompile import cli

    seen = {}

    def fake_load(path, **kw):
        seen.update(kw, path=path)
        raise BundleError("refused for the test")

    monkeypatch.setattr(pdcompile, "load", fake_load)
    rc = cli.main(["generate", str(tmp_path), "--trust-native-code", "--public-key", "k.pem"])
    assert rc == 2 and "refused for the test" in capsys.readouterr().err
    assert seen == {"path": str(tmp_path), "trust_native_code": True, "public_key": "k.pem"}
    cli.main(["generate", str(tmp_path)])
    assert seen["trust_native_code"] is False and seen["public_key"] is None
