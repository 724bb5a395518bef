"""prefill_dtype="bfloat16": the bf16_matmuls pass, the phase it runs on per backend, the
fallback on CPUs without bf16 kernels, and what export() refuses.

The reference is the HF model itself with every nn.Linear computing as the pass makes it
(inputs, weight and bias rounded to bfloat16, product back to float32) for the prompt, then
float32 for the decode steps that follow from its cache. pdcompile computes the rest of the
graph with other kernels (fused attention), whose float32 differences can move a bf16
rounding of an activation by one step: logits agree within 5e-3 (magnitude ~2), where the
float32 model differs from both by ~2e-2; greedy tokens are identical.

These tests run on any CPU: where it has no bf16 kernels, torch emulates them (slower, same
results), and the hardware check that would otherwise keep float32 is told the CPU has them.
"""

import contextlib
import logging

import pytest
import torch
import torch.nn.functional as F

import models
import pdcompile
from pdcompile.hf_compat import cache_arg, output_cache
from pdcompile.passes import bf16_matmuls

ATOL = 5e-3
NEW = 12
_CACHE = {}


@pytest.fixture(autouse=True)
def _bf16_cpu(monkeypatch):
    monkeypatch.setattr(bf16_matmuls, "bf16_supported", lambda device: (True, "bf16 kernels (emulated in the test)"))


def optimized(backend, **options):
    key = (backend, tuple(sorted(options.items())))
    if key not in _CACHE:
        model = models.build("llama")
        _CACHE[key] = model, pdcompile.optimize(model, backend=backend, prefill_dtype="bfloat16", max_seq_len=96,
                                                max_batch_size=2, cache=False, **options)
    return _CACHE[key]


@contextlib.contextmanager
def bf16_linears(model):
    """Every nn.Linear of ``model`` computes in bf16 (fp32 accumulation), as bf16_matmuls rewrites it."""
    def forward(self, x):
        bias = None if self.bias is None else self.bias.bfloat16()
        return F.linear(x.bfloat16(), self.weight.bfloat16(), bias).float()

    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    for m in linears:
        m.forward = forward.__get__(m)
    try:
        yield
    finally:
        for m in linears:
            del m.forward


def reference(model, ids, new_tokens):
    """(first-token logits, greedy tokens): the prompt with bf16 linears, decode in fp32."""
    with bf16_linears(model):
        out = model(ids, use_cache=True)
    first = out.logits[:, -1]
    tokens, past, nxt = [], output_cache(out), first.argmax(-1, keepdim=True)
    for _ in range(new_tokens):
        tokens.append(nxt)
        out = model(nxt, **{cache_arg(model): past}, use_cache=True)
        past, nxt = output_cache(out), out.logits[:, -1].argmax(-1, keepdim=True)
    return first, torch.cat(tokens, 1)


def _prompt(n, seed):
    return torch.randint(3, models.VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("backend", ["eager", "onnxruntime", "inductor"])
def test_bf16_prefill_matches_the_bf16_reference(backend):
    model, fast = optimized(backend)
    for n, seed in ((5, 0), (23, 1)):  # one block and less; more than one 16-token block
        ids = _prompt(n, seed)
        first, want = reference(model, ids, NEW)
        got_first = fast(ids, logits_to_keep=1).logits[:, -1]
        fp32 = model(ids).logits[:, -1]
        # inductor's bf16 GEMM kernels round differently from oneDNN's on CPUs with AVX-512 BF16
        # but no AMX: up to 2 bf16 steps (2^-7 each) at logits of magnitude ~1 (seen: 0.0156)
        tol = 2.5e-2 if backend == "inductor" else ATOL
        assert (got_first - first).abs().max() < tol
        assert (fp32 - first).abs().max() > 2 * ATOL  # the reference is a different function from fp32
        out = fast.generate(ids, max_new_tokens=NEW, do_sample=False, pad_token_id=0)
        assert out[:, n:].tolist() == want.tolist()


def test_pass_converts_every_linear_of_the_prefill_like_graphs_only():
    model, fast = optimized("onnxruntime")
    report = fast.pdcompile_report()
    layers = model.config.num_hidden_layers
    for phase in ("prefill", "extend"):
        rec = next(r for r in report.phases[phase] if r.name == bf16_matmuls.NAME)
        assert rec.matches == 7 * layers + 1  # q, k, v, o, gate, up, down per layer, and the lm_head
    decode = fast.graphs["decode"].gm
    assert all(n.meta["val"].dtype != torch.bfloat16 for n in decode.graph.nodes
               if isinstance(n.meta.get("val"), torch.Tensor))
    assert not any(r.name == bf16_matmuls.NAME for r in report.phases["decode"])
    # the copies are made once and shared by the phases' graphs
    prefill, extend = (fast.graphs[p].gm for p in ("prefill", "extend"))
    name = next(n for n, _ in prefill.named_buffers() if n.startswith("bf16_"))
    assert getattr(prefill, name).data_ptr() == getattr(extend, name).data_ptr()


def test_onnxruntime_runs_bf16_prefill_on_eager_and_decode_on_onnxruntime():
    _, fast = optimized("onnxruntime")
    phases = fast.runner.executor.phases
    assert isinstance(phases["prefill"][0], torch.fx.GraphModule)  # the eager backend's callable
    assert type(phases["decode"][0]).__module__ == "pdcompile.backends.onnxruntime"
    # where oneDNN has bf16 kernels, the eager phase calls them on pre-reordered weights
    packed = [n for n in phases["prefill"][0].graph.nodes if n.target is torch.ops.mkldnn._linear_pointwise.default]
    onednn = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert len(packed) == (15 if onednn else 0)


def test_prepacked_linears_compute_the_same_products():
    from pdcompile.backends.eager import prepack_bf16_linears

    if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        pytest.skip("oneDNN has no bf16 kernels on this CPU: the eager backend keeps aten.linear")
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.SiLU(), torch.nn.Linear(96, 32, bias=False))
    x = torch.randn(3, 11, 64).bfloat16()
    gm = torch.export.export(model.to(torch.bfloat16), (x,)).module()
    gm.graph.eliminate_dead_code()
    for n in gm.graph.nodes:  # what the pass leaves: linear on constant weights, inputs with fake values
        if n.op == "placeholder":
            n.meta["val"] = x
    packed = prepack_bf16_linears(gm)
    assert sum(n.target is torch.ops.mkldnn._linear_pointwise.default for n in packed.graph.nodes) == 2
    got = packed(x)  # the copy's graph returns the exported graph's flat outputs
    assert torch.equal(got[0] if isinstance(got, tuple) else got, gm(x))


def test_cpu_without_bf16_keeps_float32_and_says_so(monkeypatch, caplog):
    monkeypatch.setattr(bf16_matmuls, "bf16_supported", lambda device: (False, "CPU without AVX-512 BF16 or AMX"))
    model = models.build("llama")
    with caplog.at_level(logging.WARNING, logger="pdcompile"):
        fast = pdcompile.optimize(model, backend="eager", prefill_dtype="bf16", max_seq_len=64, max_batch_size=1,
                                  prefix_cache=False, cache=False)
    assert any("prefill_dtype='bfloat16' ignored: CPU without AVX-512 BF16 or AMX" in r.getMessage()
               for r in caplog.records)
    rec = next(r for r in fast.pdcompile_report().phases["prefill"] if r.name == bf16_matmuls.NAME)
    assert rec.matches == 0
    ids = _prompt(9, 2)
    assert torch.equal(fast.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0),
                       model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0))


def test_bad_prefill_dtype_and_both_ways_are_refused():
    model = models.build("llama")
    with pytest.raises(ValueError, match="prefill_dtype must be one of float32, bfloat16, got 'float16'"):
        pdcompile.optimize(model, backend="eager", prefill_dtype="float16")
    with pytest.raises(ValueError, match="not both"):
        pdcompile.optimize(model, backend="eager", prefill_dtype="bfloat16", config=pdcompile.OptimizeConfig())


def test_export_for_onnxruntime_refuses_bf16_prefill_before_lowering(tmp_path):
    _, fast = optimized("onnxruntime")
    with pytest.raises(ValueError, match="prefill, extend graphs compute their linear layers in bfloat16"):
        pdcompile.export(fast, tmp_path / "bundle", backend="onnxruntime")
    assert not (tmp_path / "bundle").exists()
