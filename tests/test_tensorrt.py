"""TensorRT backend: greedy tokens identical to HF eager, in process and through a bundle.

The engine tests need CUDA and torch-tensorrt and are skipped, with the reason, where
either is missing. Everywhere: the missing-extra error, the CPU refusal, the
optimisation profile, and the lowered program TensorRT would be handed, run by PyTorch.
"""

import dataclasses
import sys
import types

import pytest
import torch

import models
from conftest import optimized
import pdcompile
from pdcompile.backends import tensorrt as trt_backend
from pdcompile.bundle import read_manifest


def _torch_tensorrt_importable() -> bool:
    try:
        import torch_tensorrt  # noqa: F401
    except Exception:  # not installed, or its TensorRT libraries fail to load
        return False
    return True


HAVE_TRT = _torch_tensorrt_importable()
needs_trt = pytest.mark.skipif(
    not HAVE_TRT, reason="torch_tensorrt is not installed (TensorRT cannot be installed on this machine)"
)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="TensorRT needs a CUDA device; none is available")
NEW_TOKENS = 32


@pytest.mark.skipif(HAVE_TRT, reason="torch_tensorrt is installed: the missing-extra error cannot occur")
def test_missing_torch_tensorrt_names_the_extra():
    with pytest.raises(ImportError, match=r"pip install 'pdcompile\[tensorrt\]'"):
        pdcompile.optimize(models.build("llama"), backend="tensorrt")


def test_cpu_model_is_refused(llama_eager, monkeypatch):
    # Stand-ins for the two modules, so the device check is reached without TensorRT.
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    monkeypatch.setitem(sys.modules, "torch_tensorrt", types.ModuleType("torch_tensorrt"))
    _, fast = llama_eager
    decode = fast.graphs["decode"]
    with pytest.raises(ValueError, match="TensorRT runs on CUDA devices; this model is on cpu"):
        trt_backend.TensorRTBackend().lower(decode.gm, decode.ctx)


def test_optimization_profile():
    _, fast = optimized("llama", "eager", paged=False)  # tiny llama: 2 kv heads of 16, max_seq_len=256
    prefill = trt_backend.optimization_profile(fast.graphs["prefill"].ctx)
    assert [p[0] for p in prefill] == ["input_ids", "last_idx", "caches_0", "caches_1", "caches_2", "caches_3"]
    assert prefill[0][1:] == ((1, 1), (1, 128), (8, 256), torch.int64)
    assert prefill[1][1:] == ((1,), (1,), (8,), torch.int64)
    assert prefill[2][1:] == ((1, 2, 2, 16), (1, 2, 256, 16), (8, 2, 256, 16), torch.float32)
    decode = trt_backend.optimization_profile(fast.graphs["decode"].ctx)
    assert decode[0][1:] == ((1, 1), (1, 1), (8, 1), torch.int64)
    assert decode[1][0] == "pos"
    assert decode[2][1:4] == prefill[2][1:4]
    ctx = fast.graphs["prefill"].ctx
    small_cache = dataclasses.replace(ctx.cache, max_batch_size=1, max_seq_len=64)
    small = trt_backend.optimization_profile(dataclasses.replace(ctx, cache=small_cache))
    assert small[0][1:4] == ((1, 1), (1, 64), (1, 64))  # opt shapes clipped to the limits
    assert small[2][1:4] == ((1, 2, 2, 16), (1, 2, 64, 16), (1, 2, 64, 16))


def test_optimization_profile_paged(llama_eager):
    _, fast = llama_eager  # paged: block tables, slot mappings and pools of 16-token blocks
    prefill = trt_backend.optimization_profile(fast.graphs["prefill"].ctx, pool_blocks=129)
    assert [p[0] for p in prefill] == ["input_ids", "last_idx", "block_table", "slot_mapping",
                                       "pool_0", "pool_1", "pool_2", "pool_3"]
    assert prefill[2][1:4] == ((1, 1), (1, 16), (8, 16))  # up to 256 / 16 blocks per sequence (opt clipped)
    assert prefill[3][1:4] == ((1, 1), (1, 128), (8, 256))
    assert prefill[4][1:4] == ((129, 16, 2, 16),) * 3  # the pool the runtime allocated
    decode = trt_backend.optimization_profile(fast.graphs["decode"].ctx, pool_blocks=129)
    assert decode[3][0] == "slot_mapping" and decode[3][1:4] == ((1,), (1,), (8,))


def _assert_greedy_parity(model, fast, lengths):
    ids, mask = models.left_padded_batch(lengths=lengths)
    ids, mask = ids.to(model.device), mask.to(model.device)
    kw = dict(max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    ref = model.generate(input_ids=ids, attention_mask=mask, **kw)
    out = fast.generate(input_ids=ids, attention_mask=mask, **kw)
    # A degenerate reference (one repeated token) would make equality meaningless.
    assert len(set(ref[0, ids.shape[1]:].tolist())) >= 8
    assert torch.equal(ref, out)


def test_lowered_program_matches_hf(monkeypatch):
    """What TensorRT is handed, run by PyTorch instead: the functional program and the
    write-back of the updated caches keep greedy tokens identical to HF eager."""

    class TorchRunsTheProgram(pdcompile.backends.Backend):
        name = "trt-lowering"

        def lower(self, gm, ctx):
            program = trt_backend._exported(gm, ctx).module()
            return trt_backend.CompiledPhase(program, trt_backend._n_small(ctx.signature))

    monkeypatch.setitem(pdcompile.backends.BACKENDS, "trt-lowering", TorchRunsTheProgram)
    model = models.build("llama")
    fast = pdcompile.optimize(model, backend="trt-lowering", max_seq_len=256)
    _assert_greedy_parity(model, fast, (11, 6, 3))


# ------------------------------------------------------------------ on a CUDA machine


@pytest.fixture(scope="module")
def llama_trt():
    model = models.build("llama").cuda()
    return model, pdcompile.optimize(model, backend="tensorrt", max_seq_len=256)


@pytest.mark.parametrize("lengths", [(9,), (11, 6, 3)])
@needs_cuda
@needs_trt  # the closest mark is evaluated first: its reason is the one reported
def test_greedy_parity(llama_trt, lengths):
    model, fast = llama_trt
    _assert_greedy_parity(model, fast, lengths)


@needs_cuda
@needs_trt
def test_bundle_round_trip(llama_trt, tmp_path):
    model, fast = llama_trt
    path = pdcompile.export(fast, tmp_path / "llama-trt", backend="tensorrt")
    manifest = read_manifest(path)
    for phase in ("prefill", "decode"):
        entry = manifest["phases"][phase]
        assert entry["files"] == [f"{phase}.engine"]
        assert entry["engine_inputs"][:2] == ["input_ids", "last_idx" if phase == "prefill" else "pos"]
        assert len(entry["engine_outputs"]) == len(entry["engine_inputs"]) - 1
    loaded = pdcompile.load(path, trust_native_code=True)  # engines loaded by the TensorRT runtime, no HF model
    _assert_greedy_parity(model, loaded, (11, 6, 3))
