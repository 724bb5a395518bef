"""pdcompile.export / pdcompile.load: round trip in a fresh process, corruption, no pickle."""

import json
import pickle

import pytest
import torch

import hostile
import models
import pdcompile
from conftest import optimized
from pdcompile.manifest import FORMAT_VERSION, digest

KW = dict(max_new_tokens=24, do_sample=False, pad_token_id=0)


@pytest.fixture(scope="module", params=["onnxruntime", "inductor"])
def bundle(request, tmp_path_factory):
    model, fast = optimized("qwen2", "eager")
    path = tmp_path_factory.mktemp("bundles") / f"qwen2-{request.param}.pdc"
    pdcompile.export(fast, path, backend=request.param, tokenizer=models.word_tokenizer())
    return request.param, model, path


def test_load_in_fresh_process_same_tokens(bundle):
    backend, model, path = bundle
    ids, mask = models.left_padded_batch()
    ref = model.generate(input_ids=ids, attention_mask=mask, **KW)
    out = models.generate_in_fresh_process(path, KW, "trust_native_code=True", "assert m.original_model is None\n")
    assert torch.equal(out, ref)


def test_bundle_contents(bundle):
    backend, model, path = bundle
    manifest = json.loads((path / "manifest.json").read_text())
    ext = {"onnxruntime": ".onnx", "inductor": ".pt2"}[backend]
    assert manifest["backend"] == backend and manifest["format_version"] == FORMAT_VERSION
    assert {"prefill" + ext, "decode" + ext, "config.json", "tokenizer.json"} <= set(manifest["files"])
    assert manifest["versions"]["torch"] == torch.__version__
    assert manifest["cache"]["layers"][0] == {"kv_heads": 2, "head_dim": 16, "v_head_dim": 16, "window": 0}
    decode_inputs = manifest["phases"]["decode"]["signature"]["inputs"]
    assert decode_inputs[1]["name"] == "pos" and decode_inputs[1]["role"] == "positions"
    assert not any(f.endswith((".pkl", ".pt", ".bin", ".pth")) for f in manifest["files"])
    # the tokenizer saved in the bundle loads with transformers as usual
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(path).convert_tokens_to_ids(["w5", "w6"]) == [5, 6]


def test_load_never_unpickles(bundle, monkeypatch):
    backend, model, path = bundle

    def forbidden(*a, **k):
        raise AssertionError("bundle loading must not unpickle")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    real_torch_load = torch.load

    def torch_load(*a, **k):
        if not k.get("weights_only", False):
            raise AssertionError("torch.load without weights_only=True while loading a bundle")
        return real_torch_load(*a, **k)

    monkeypatch.setattr(torch, "load", torch_load)
    m = pdcompile.load(path, trust_native_code=True)
    ids, mask = models.left_padded_batch()
    out = m.generate(input_ids=ids, attention_mask=mask, **KW)
    assert out.shape == (3, ids.shape[1] + 24)


# Round trip on every backend that exports, for every parity family. In the default run
# one family per backend; AOTInductor compiles take about a minute per phase on 2 cores,
# so the whole matrix is `slow`.
DEFAULT_ROUND_TRIPS = {("llama", "inductor"), ("gpt2", "onnxruntime")}


def _round_trips():
    for backend in ("onnxruntime", "inductor"):
        for family in models.FAMILIES:
            marks = () if (family, backend) in DEFAULT_ROUND_TRIPS else (pytest.mark.slow,)
            yield pytest.param(family, backend, marks=marks, id=f"{family}-{backend}")


@pytest.mark.parametrize("family,backend", list(_round_trips()))
def test_round_trip_every_family(family, backend, tmp_path):
    """optimize() on ``backend`` in process, export on the same backend, load: HF's tokens.

    The in-process compile comes first on purpose: inductor's compile_fx once rewrote the
    kept graphs to return ``[logits]``, and the AOTInductor package exported from them
    then returned a list that generate() could not use."""
    model, fast = optimized(family, backend)
    for phase, graph in fast.graphs.items():
        out = next(n for n in graph.gm.graph.nodes if n.op == "output").args[0]
        assert isinstance(out, torch.fx.Node), f"the kept {phase} graph returns {type(out).__name__}, not the logits"
    path = pdcompile.export(fast, tmp_path / f"{family}.pdc", backend=backend)
    loaded = pdcompile.load(path, trust_native_code=True)
    ids, mask = models.left_padded_batch()
    ref = model.generate(input_ids=ids, attention_mask=mask, **KW)
    out = loaded.generate(input_ids=ids, attention_mask=mask, **KW)
    assert torch.equal(out, ref)


def test_native_code_needs_consent(bundle, tmp_path, monkeypatch):
    """ONNX bundles are data: they load without consent. An inductor bundle holds compiled
    libraries: refused without trust_native_code=True, before any package is opened. A
    real package whose library is swapped for one that writes a file when loaded (the
    manifest rewritten with fresh hashes, as anyone who can write the folder could):
    without consent nothing runs; with consent it does, so the check is what stops it."""
    import torch._inductor

    backend, model, path = bundle
    if backend == "onnxruntime":
        assert pdcompile.load(path).original_model is None
        return
    calls = []
    real = torch._inductor.aoti_load_package
    monkeypatch.setattr(torch._inductor, "aoti_load_package", lambda *a, **k: calls.append(a) or real(*a, **k))
    with pytest.raises(pdcompile.BundleError, match=r"holds native code: its inductor engines \(decode.pt2, prefill.pt2\)"):
        pdcompile.load(path)
    assert calls == []

    dst = _copy(path, tmp_path)
    hostile.swap_library(dst / "decode.pt2", hostile.library(tmp_path))
    manifest = json.loads((dst / "manifest.json").read_text())
    hostile.rehash(dst, manifest, "decode.pt2")
    hostile.reseal(dst, manifest)
    sentinel = tmp_path / "sentinel"
    monkeypatch.setenv(hostile.SENTINEL_ENV, str(sentinel))
    with pytest.raises(pdcompile.BundleError, match="holds native code"):
        pdcompile.load(dst)
    assert calls == [] and not sentinel.exists()
    with pytest.raises(pdcompile.BundleError, match="the decode engine decode.pt2 does not load with inductor"):
        pdcompile.load(dst, trust_native_code=True)
    assert sentinel.read_text() == "native code from the bundle ran\n"


def _copy(path, tmp_path):
    import shutil

    dst = tmp_path / "copy.pdc"
    shutil.copytree(path, dst)
    return dst


def test_corrupted_engine_file(bundle, tmp_path):
    backend, model, path = bundle
    dst = _copy(path, tmp_path)
    engine = next(f for f in dst.iterdir() if f.name.startswith("decode."))
    data = bytearray(engine.read_bytes())
    data[len(data) // 2] ^= 0xFF
    engine.write_bytes(bytes(data))
    with pytest.raises(pdcompile.BundleError, match=rf"{engine.name} does not match its sha256"):
        pdcompile.load(dst, trust_native_code=True)


def test_truncated_and_missing_files(bundle, tmp_path):
    backend, model, path = bundle
    dst = _copy(path, tmp_path)
    engine = next(f for f in dst.iterdir() if f.name.startswith("prefill."))
    engine.write_bytes(engine.read_bytes()[:100])
    with pytest.raises(pdcompile.BundleError, match="bytes, the manifest says"):
        pdcompile.load(dst, trust_native_code=True)
    engine.unlink()
    with pytest.raises(pdcompile.BundleError, match=f"{engine.name} is missing"):
        pdcompile.load(dst, trust_native_code=True)


def test_bad_manifest(bundle, tmp_path):
    backend, model, path = bundle
    dst = _copy(path, tmp_path)
    mf = dst / "manifest.json"
    manifest = json.loads(mf.read_text())
    mf.write_text(mf.read_text()[:-20])
    with pytest.raises(pdcompile.BundleError, match="not valid JSON"):
        pdcompile.load(dst, trust_native_code=True)
    mf.write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(pdcompile.BundleError, match="format version 99 is newer"):
        pdcompile.load(dst, trust_native_code=True)
    mf.unlink()
    with pytest.raises(pdcompile.BundleError, match="manifest.json is missing"):
        pdcompile.load(dst, trust_native_code=True)


def test_incompatible_torch_version(bundle, tmp_path):
    backend, model, path = bundle
    if backend != "inductor":
        pytest.skip("only AOTInductor packages are tied to the torch version; ONNX models are not")
    dst = _copy(path, tmp_path)
    mf = dst / "manifest.json"
    manifest = json.loads(mf.read_text())
    manifest["versions"]["torch"] = "2.9.0+cpu"
    # written as export would (with its digest): the version check itself is under test
    mf.write_text(json.dumps(manifest))
    (dst / "manifest.sha256").write_text(json.dumps(digest(manifest)))
    with pytest.raises(pdcompile.BundleError, match="compiled with torch 2.9.0"):
        pdcompile.load(dst, trust_native_code=True)


def test_export_refuses_what_it_cannot_write(tmp_path):
    model, fast = optimized("qwen2", "eager")
    with pytest.raises(ValueError, match="eager backend runs Python graphs and has no engine"):
        pdcompile.export(fast, tmp_path / "x", backend="eager")
    with pytest.raises(TypeError, match="takes the model returned by pdcompile.optimize"):
        pdcompile.export(model, tmp_path / "y")
    (tmp_path / "z").mkdir()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        pdcompile.export(fast, tmp_path / "z")


@pytest.mark.parametrize("max_batch_size", [1, 2])
def test_engine_export_with_small_max_batch_size(max_batch_size):
    """The re-export every engine starts from works for tiny batch limits too (a batch
    example of 2 once tied the batch to the example block table's width), and the exported
    program computes what the graph does at the largest allowed batch."""
    from pdcompile.backends.inductor import _with_reference_attention
    from pdcompile.backends.program import export_program
    from pdcompile.cost import example_inputs

    model = models.build("llama")
    fast = pdcompile.optimize(model, backend="eager", max_batch_size=max_batch_size, max_seq_len=256)
    for phase in ("prefill", "decode"):
        ctx = fast.graphs[phase].ctx
        gm = _with_reference_attention(fast.graphs[phase].gm)
        ep = export_program(gm, ctx)
        torch.manual_seed(0)
        args = [a.random_(3, 200) if a.dtype == torch.long and i == 0 else a
                for i, a in enumerate(example_inputs(ctx.signature, max_batch_size, 7, 32))]
        expected = gm(*[a.clone() for a in args])
        got = ep.module()(*[a.clone() for a in args])
        torch.testing.assert_close(got[0] if isinstance(got, (tuple, list)) else got,
                                   expected[0] if isinstance(expected, (tuple, list)) else expected)
