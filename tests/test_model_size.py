"""Real model sizes: weights never copied into ONNX protobufs, bundles with external data,
the memory check before any work, bf16 models; slow: 0.5B / 1.5B / 3B measured in a
subprocess (optimize() time, peak RSS growth <= 2x the weight bytes, greedy tokens = HF)."""

import json
import logging
import os
import re
import subprocess
import sys

import pytest
import torch

import models
import pdcompile
from conftest import optimized
from pdcompile import memory
from pdcompile.models import SIZES, sized_config

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def test_sized_configs_have_the_published_parameter_counts():
    from transformers import AutoModelForCausalLM

    published = {"qwen2.5-0.5b": 0.49e9, "qwen2.5-1.5b": 1.54e9, "qwen2.5-3b": 3.09e9}
    for name in SIZES:
        with torch.device("meta"):  # no memory
            model = AutoModelForCausalLM.from_config(sized_config(name))
        assert round(sum(p.numel() for p in model.parameters()) / 1e7) == round(published[name] / 1e7)


def test_onnxruntime_sessions_read_the_model_weights_in_place():
    """Every weight the ONNX graphs use is the model's own memory, in both phases: no copy
    in a protobuf (so no 2 GB limit) and none per session; and the tokens are still HF's."""
    model, fast = optimized("qwen2", "onnxruntime")
    weights = {p.data_ptr() for p in model.parameters() if p.numel() * p.element_size() >= 1024}
    for phase in ("prefill", "decode"):
        engine = fast.runner.executor.phases[phase][0]
        tensors, initializers = engine.keep
        shared = {t.data_ptr() for t in tensors if isinstance(t, torch.Tensor)}
        assert weights <= shared, f"{phase}: {len(weights - shared)} weights are not read in place"
        assert {v.data_ptr() for v in initializers.values()} <= shared | {
            t.ctypes.data for t in tensors if not isinstance(t, torch.Tensor)}
    # the sessions' protobufs hold the graph only: the weights are given to them from outside it
    total = memory.weight_bytes(model)
    for phase in ("prefill", "decode"):
        engine = fast.runner.executor.phases[phase][0]
        # (a protobuf holding the weights would be larger than they are)
        assert engine.shared_bytes >= 0.9 * total and engine.proto_bytes < total, (phase, engine.proto_bytes)
    ids, mask = models.left_padded_batch()
    kw = dict(max_new_tokens=16, do_sample=False, pad_token_id=0)
    assert torch.equal(fast.generate(input_ids=ids, attention_mask=mask, **kw),
                       model.generate(input_ids=ids, attention_mask=mask, **kw))


def test_bundle_with_external_data_same_tokens(tmp_path, monkeypatch):
    """The path a model over 2 GB takes (weights in <phase>.onnx.data), forced on a tiny model."""
    from pdcompile.backends import onnxruntime as ort_backend

    monkeypatch.setattr(ort_backend, "EXTERNAL_DATA_BYTES", 0)
    model, fast = optimized("qwen2", "eager")
    path = pdcompile.export(fast, tmp_path / "q.pdc", backend="onnxruntime")
    import onnx

    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    for phase in ("prefill", "decode"):
        assert (path / f"{phase}.onnx.data").stat().st_size >= 0.9 * weights
        proto = onnx.load(str(path / f"{phase}.onnx"), load_external_data=False)
        inline = [t.name for t in proto.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL
                  and len(t.raw_data) > 256]
        assert not inline, inline  # every weight is in the side file
    manifest = json.loads((path / "manifest.json").read_text())
    assert {"prefill.onnx.data", "decode.onnx.data"} <= set(manifest["files"])  # hashed like every file
    ids, mask = models.left_padded_batch()
    kw = dict(max_new_tokens=16, do_sample=False, pad_token_id=0)
    ref = model.generate(input_ids=ids, attention_mask=mask, **kw)
    out = pdcompile.load(path).generate(input_ids=ids, attention_mask=mask, **kw)
    assert torch.equal(out, ref)


def _no_memory(monkeypatch, available=300 << 20):
    monkeypatch.setattr(memory, "available_bytes", lambda: (available, "test"))


def test_memory_check_refuses_before_any_work(monkeypatch):
    model = models.build("llama")

    def capture(*args, **kwargs):
        raise AssertionError("capture started although the model cannot fit")

    monkeypatch.setattr(pdcompile.capture, "capture", capture)
    _no_memory(monkeypatch)
    with pytest.raises(memory.InsufficientMemoryError) as err:
        pdcompile.optimize(model, backend="onnxruntime", max_seq_len=256, kv_cache_memory=1 << 30)
    msg = str(err.value)
    # the numbers: what it needs (by part) and what is available, and what to do
    need = float(re.search(r"needs about ([0-9.]+) GB", msg).group(1))
    assert need > 1.1 and "only 0.3 GB is available" in msg, msg
    assert "paged KV pool 1.1 GB" in msg and "kv_cache_memory" in msg and memory.SKIP_ENV in msg, msg
    assert isinstance(err.value, MemoryError)


def test_memory_check_can_be_skipped(monkeypatch, caplog):
    model = models.build("llama")
    _no_memory(monkeypatch)
    monkeypatch.setenv(memory.SKIP_ENV, "1")
    with caplog.at_level(logging.WARNING, logger="pdcompile.memory"):
        fast = pdcompile.optimize(model, backend="eager", max_seq_len=64)
    assert memory.SKIP_ENV in caplog.text and "is available" in caplog.text
    ids = torch.tensor([[5, 6, 7]])
    assert torch.equal(fast.generate(ids, max_new_tokens=4, do_sample=False),
                       model.generate(ids, max_new_tokens=4, do_sample=False))


def test_weight_bytes_counts_tied_weights_once():
    model = pdcompile.models.random_model("qwen2.5-0.5b", num_hidden_layers=1, vocab_size=1000)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    params = sum(p.numel() * p.element_size() for p in model.parameters())  # tied: listed once
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    assert memory.weight_bytes(model) == params + buffers


# bf16 tolerance: logits of the tiny model are within +-6; bf16 keeps 8 significant bits
# (relative step 2^-8 = 0.4%), and HF's bf16 run rounds after every op while the
# onnxruntime backend computes in fp32 (CPU ONNX Runtime has no bf16 matmul), so the two
# differ by a few bf16 steps of the largest logits: 0.1 absolute.
BF16_ATOL = 0.1


@pytest.mark.parametrize("backend", ["eager", "onnxruntime"])
def test_bf16_model_matches_hf_bf16(backend):
    model = models.build("qwen2").to(torch.bfloat16)
    fast = pdcompile.optimize(model, backend=backend, max_seq_len=128)
    ids, mask = models.left_padded_batch(lengths=(9,))
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_logits=True)
    ref = model.generate(input_ids=ids, attention_mask=mask, **kw)
    out = fast.generate(input_ids=ids, attention_mask=mask, **kw)
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(ref.logits, out.logits):
        torch.testing.assert_close(b.float(), a.float(), atol=BF16_ATOL, rtol=0)


def test_bf16_paged_pools_are_converted_as_gathered(monkeypatch):
    # float32 compute over a bf16 pool: the onnxruntime graph converts the blocks it gathers,
    # not the whole pool after each step's write (a Cast of every written pool, before)
    pytest.importorskip("onnxruntime")
    import pdcompile.backends.onnxruntime as ort_backend

    seen = {}
    lower = ort_backend.onnx_ir_model

    def recording(gm, ctx, *args):
        model = lower(gm, ctx, *args)
        seen[ctx.phase] = [n.inputs[0].producer().op_type for n in model.graph if n.op_type in ("Cast", "CastLike")
                           and n.inputs[0].producer() is not None]
        return model

    monkeypatch.setattr(ort_backend, "onnx_ir_model", recording)
    model = models.build("qwen2").to(torch.bfloat16)
    pdcompile.optimize(model, backend="onnxruntime", max_seq_len=128, cache=False)
    for phase in ("decode", "extend"):
        assert "ScatterND" not in seen[phase], seen[phase]  # no cast reads a written pool
        assert seen[phase].count("Reshape") >= 2 * model.config.num_hidden_layers, seen[phase]  # the gathered k and v blocks


# --------------------------------------------------------------------------- slow: real sizes

SIZE_CASES = [
    ("qwen2.5-0.5b", "onnxruntime", "float32"),
    ("qwen2.5-0.5b", "inductor", "float32"),
    ("qwen2.5-0.5b", "eager", "float32"),
    ("qwen2.5-1.5b", "onnxruntime", "float32"),
    ("qwen2.5-1.5b", "inductor", "float32"),
    ("qwen2.5-1.5b", "eager", "float32"),
    ("qwen2.5-3b", "onnxruntime", "bfloat16"),
    ("qwen2.5-3b", "inductor", "bfloat16"),
    ("qwen2.5-3b", "eager", "bfloat16"),
]


@pytest.mark.slow
@pytest.mark.parametrize("size,backend,dtype", SIZE_CASES)
def test_real_size(size, backend, dtype):
    """optimize() of a real-size model in its own process: peak RSS growth <= 2x the weight
    bytes, and 8 greedy tokens identical to HF eager's."""
    config = sized_config(size)
    with torch.device("meta"):
        from transformers import AutoModelForCausalLM

        n = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    weights = n * torch.empty((), dtype=getattr(torch, dtype)).element_size()
    need = 2.3 * weights + 2e9  # the model, optimize()'s growth (<= ~1.2x measured), headroom
    if memory.available_bytes()[0] < need:
        pytest.skip(f"needs ~{need / 1e9:.0f} GB available, have {memory.available_bytes()[0] / 1e9:.0f} GB")
    proc = subprocess.run(
        [sys.executable, "-m", "pdcompile.size_bench", size, backend, "--dtype", dtype],
        capture_output=True, text=True, timeout=5400, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert result["peak_growth"] <= 2 * result["weight_bytes"], result
    assert len(set(result["reference"])) >= 4, result  # a degenerate reference would prove nothing
    if dtype == "float32":
        assert result["tokens_match"], result
    else:  # see size_bench.compare: identical up to a near-tie of the reference, within bf16 tolerance
        assert result["agree"] and result["steps_compared"] >= 2, result
