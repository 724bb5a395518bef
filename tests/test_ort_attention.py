"""onnxruntime: attention over contiguous caches as GroupQueryAttention (ort_attention.py).

For each family: greedy tokens identical to HF eager and logits within test_parity's
tolerance, and the decode graph holds one GroupQueryAttention per layer where the op can
express the attention (rotary inside it where the rotary matched), none where it cannot;
the prefill graph one per layer but the last (pruned to one query per row: decomposed).
Over the paged pool, decode attention is one ONNX ``Attention`` per layer over the gathered
blocks (paged_attention_onnx), and the rotary of q and k ONNX ``RotaryEmbedding`` nodes.
Neither decode graph keeps a Transpose: with one token per row they only move size-1 axes
and become Reshapes (ort_layout.py).
"""

import pytest
import torch

import models
import pdcompile
from conftest import optimized
from test_parity import ATOL, RTOL, _batch

pytest.importorskip("onnxruntime")

NEW_TOKENS = 24
LAYERS = 2

# family -> (GroupQueryAttention nodes in the decode graph, rotary folded into them)
EXPECTED = {
    "llama": (LAYERS, True),
    "qwen2": (LAYERS, True),  # q/k/v biases stay in the projections
    "mistral": (LAYERS, True),  # sliding window: local_window_size
    "gpt2": (LAYERS, False),  # no rotary, multi-head
    "phi": (LAYERS, False),  # partial rotary (50%): the graph keeps its own rotary
    "gemma2": (0, False),  # attention logit soft-capping: not a pdcompile::attention, stays decomposed
}


def _decode_ops(fast, phase="decode"):
    return fast.runner.executor.phases[phase][0].op_types


def _assert_generates_like_hf(model, fast):
    """Greedy tokens identical to HF eager over a left-padded batch of 3, logits within tolerance."""
    ids, mask = _batch(3)
    kw = dict(max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0, return_dict_in_generate=True,
              output_logits=True)
    ref = model.generate(input_ids=ids, attention_mask=mask, **kw)
    out = fast.generate(input_ids=ids, attention_mask=mask, **kw)
    assert torch.equal(ref.sequences, out.sequences)
    for step, (a, b) in enumerate(zip(ref.logits, out.logits)):
        torch.testing.assert_close(b, a, atol=ATOL, rtol=RTOL, msg=lambda m: f"step {step}: {m}")


# The default run covers rotary inside (llama), no rotary (gpt2) and the decomposed fallback
# (gemma2); the other families compile under `slow` (~1 min each on 2 shared cores).
SLOW = ("qwen2", "mistral", "phi")


@pytest.mark.parametrize("family", [pytest.param(f, marks=(pytest.mark.slow,) if f in SLOW else ()) for f in EXPECTED])
def test_decode_attention_is_group_query_attention(family):
    model, fast = optimized(family, "onnxruntime", paged=False)
    gqa, rotary_inside = EXPECTED[family]
    ops = _decode_ops(fast)
    assert ops["GroupQueryAttention"] == gqa, ops
    if gqa:
        assert ops["Softmax"] == 0 and ops["ScatterND"] == 0, ops  # no decomposed attention or cache write left
        assert ops["Transpose"] == 0, ops  # the head moves of one token are Reshapes (ort_layout.py)
    assert _decode_ops(fast, "prefill")["GroupQueryAttention"] == max(gqa - 1, 0)
    if rotary_inside:
        assert ops["Cos"] == 0 and ops["Neg"] == 0, ops  # the rotary went into the op (do_rotary=1)
    _assert_generates_like_hf(model, fast)


@pytest.mark.parametrize("family", ["llama", pytest.param("mistral", marks=pytest.mark.slow)])
def test_paged_decode_attention_is_onnx_attention(family):
    # GQA reads a contiguous cache; the paged graph's attention gathers the pool's
    # blocks into one ONNX Attention per layer (masked by the positions), with no decomposed
    # softmax left; q's and k's rotary are ONNX RotaryEmbedding nodes (no Neg/Cos left)
    model, fast = optimized(family, "onnxruntime")
    ops = _decode_ops(fast)
    assert ops["GroupQueryAttention"] == 0 and ops["Attention"] == LAYERS and ops["Softmax"] == 0, ops
    assert ops["RotaryEmbedding"] == 2 * LAYERS and ops["Neg"] == 0 and ops["Cos"] == 0, ops
    # no layout moves of the one token left (ort_layout.py): the rotaries take q and k as projected
    assert ops["Transpose"] == 0, ops
    _assert_generates_like_hf(model, fast)


def test_paged_attention_stays_decomposed_before_opset_23(monkeypatch):
    # ONNX Runtime before 1.23 refuses opset 23 models: the paged graph keeps the decomposed
    # attention (and the exporter's default opset), with the same tokens
    import onnxruntime

    import pdcompile

    monkeypatch.setattr(onnxruntime, "__version__", "1.22.1")
    model = models.build("llama", backend="onnxruntime")
    fast = pdcompile.optimize(model, backend="onnxruntime", max_seq_len=256, prefix_cache=False)
    ops = _decode_ops(fast)
    assert ops["Attention"] == 0 and ops["Softmax"] == LAYERS, ops
    _assert_generates_like_hf(model, fast)


@pytest.mark.parametrize("family, layers, paged", [("mistral", 2, False), ("mistral", 2, True),
                                                   pytest.param("qwen2-hybrid", 4, False, marks=pytest.mark.slow)])
def test_sliding_window_past_the_window(family, layers, paged):
    # local_window_size (contiguous) or the Attention mask's window (paged): a 24-token prompt and
    # 48 new tokens over 16-token windows (test_sliding's models), every layer sliding (mistral)
    # or the top two of four (qwen2-hybrid)
    import pdcompile
    import test_sliding as sliding

    torch.manual_seed(0)
    model = sliding.FAMILIES[family]().eval()
    fast = pdcompile.optimize(model, backend="onnxruntime", max_seq_len=128, paged=paged, prefix_cache=False)
    if paged:
        assert _decode_ops(fast)["Attention"] == layers
    else:
        assert _decode_ops(fast)["GroupQueryAttention"] == layers
        assert _decode_ops(fast, "prefill")["GroupQueryAttention"] == layers - 1
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, sliding.V, (3, 24), generator=g)  # rows of 24, 14 and 4 real tokens, left-padded
    mask = torch.ones_like(ids)
    mask[1, :10] = 0
    mask[2, :20] = 0
    ids = ids.masked_fill(mask == 0, 0)
    kw = dict(max_new_tokens=3 * sliding.WINDOW, return_dict_in_generate=True, output_logits=True, **sliding.KW)
    ref = model.generate(input_ids=ids, attention_mask=mask, **kw)
    out = fast.generate(input_ids=ids, attention_mask=mask, **kw)
    assert len(set(ref.sequences[0, 24:].tolist())) >= 4, "degenerate reference"
    assert torch.equal(ref.sequences, out.sequences)
    for step, (a, b) in enumerate(zip(ref.logits, out.logits)):
        torch.testing.assert_close(b, a, atol=ATOL, rtol=RTOL, msg=lambda m: f"step {step}: {m}")


@pytest.mark.parametrize("family", ["llama", pytest.param("gpt2", marks=pytest.mark.slow),
                                    pytest.param("phi3", marks=pytest.mark.slow)])
def test_export_skips_decomposition_and_matches_the_exporter(family, caplog):
    """to_onnx translates our phase graphs without a second torch.export trace
    (program_from_graph) and without torch.onnx's decomposition retrace, and each phase's
    ONNX model computes what re-export + torch.onnx.export (with both) computes: the same
    logits and cache writes on random inputs, the same nodes per op type after the ONNX
    Runtime optimization except Reshape (aten.reshape stays reshape where decomposition
    writes view: at most two more Reshape per layer, which ONNX Runtime runs without a copy)."""
    import collections
    import logging

    from pdcompile.backends.onnxruntime import OrtPhase, onnx_ir_model, session_model
    from pdcompile.cost import example_inputs

    model = models.build(family)
    cfg = pdcompile.OptimizeConfig(backend="onnxruntime", cache=pdcompile.CacheConfig(max_seq_len=64))
    _, graphs, _, _ = pdcompile.api.transform(model, cfg, 64, {})
    assert set(graphs) == {"prefill", "decode", "extend"}
    gen = torch.Generator().manual_seed(0)
    for phase, g in graphs.items():
        sig = g.ctx.signature
        with caplog.at_level(logging.DEBUG, logger="pdcompile.backends.onnxruntime"):
            caplog.clear()
            fast = onnx_ir_model(g.gm, g.ctx)
            slow = [r.getMessage() for r in caplog.records if "with decompositions" in r.getMessage()
                    or "re-exporting" in r.getMessage() or "as a program failed" in r.getMessage()]
            assert not slow, (phase, slow)  # translated as captured: no second trace, no decomposition
        reference = onnx_ir_model(g.gm, g.ctx, decompose=True)
        ops = [collections.Counter((n.domain, n.op_type) for n in m.graph) for m in (fast, reference)]
        extra_reshapes = ops[0].pop(("", "Reshape"), 0) - ops[1].pop(("", "Reshape"), 0)
        assert ops[0] == ops[1] and 0 <= extra_reshapes <= 2 * LAYERS, (phase, ops[0] - ops[1], ops[1] - ops[0])

        inputs = example_inputs(sig, 3, 5, 32)
        for i, spec in enumerate(sig.inputs):
            if sig.is_state(i):
                inputs[i] = torch.randn(inputs[i].shape, generator=gen)
            elif spec.role.name == "TOKENS":
                inputs[i] = torch.randint(0, model.config.vocab_size, inputs[i].shape, generator=gen)
        runs = []
        for m in (fast, reference):
            args = [t.clone() for t in inputs]
            logits = OrtPhase(session_model(m, torch.device("cpu")), sig, torch.device("cpu"))(*args)
            runs.append([logits] + [a for i, a in enumerate(args) if sig.is_state(i)])
        for a, b in zip(*runs):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_optimizer_runs_without_the_quadratic_slices_rule():
    """onnxscript's rule tuple holds SlicesSplit (if it is renamed, _without_rules stops
    removing it and lowering turns quadratic again: this fails first); inside the context the
    rule is gone and every other rule is there; afterwards, and after an error, the tuple is
    the original one."""
    from onnxscript import rewriter

    from pdcompile.backends.onnxruntime import _without_rules

    rules = rewriter._DEFAULT_REWRITE_RULES
    assert "SlicesSplit" in [getattr(r, "name", None) for r in rules]
    with _without_rules("SlicesSplit"):
        inside = rewriter._DEFAULT_REWRITE_RULES
        assert [r for r in rules if getattr(r, "name", None) != "SlicesSplit"] == list(inside)
        assert len(inside) == len(rules) - 1
    assert rewriter._DEFAULT_REWRITE_RULES is rules
    with pytest.raises(RuntimeError), _without_rules("SlicesSplit"):
        raise RuntimeError("lowering failed")
    assert rewriter._DEFAULT_REWRITE_RULES is rules


def test_program_from_graph_computes_what_the_graph_does():
    """program_from_graph wraps a passed phase graph (cache writes functional, as the
    onnxruntime backend hands it over) as an ExportedProgram without a trace: called through
    ep.module() it gives the graph's logits and new caches, it reads the model's own
    parameter tensors (lifted, not copied), and a graph with a node only a trace can lower
    (a Python-level function) is refused (None: the backend re-exports it)."""
    from pdcompile.backends.program import copy_graph_module, program_from_graph
    from pdcompile.cost import example_inputs
    from pdcompile.ops import attention_grouped
    from pdcompile.passes.functional_cache import functionalize_cache_writes
    from pdcompile.passes.manager import refresh_meta
    from pdcompile.passes.utils import ATTENTION, PAGED_ATTENTION

    model = models.build("llama")
    fast = pdcompile.optimize(model, backend="eager", max_seq_len=64)
    params = {p.data_ptr() for p in model.parameters()}
    for phase in ("prefill", "decode"):
        g = fast.graphs[phase]
        gm = copy_graph_module(g.gm)
        functionalize_cache_writes(gm, g.ctx.signature)
        refresh_meta(gm)
        ep = program_from_graph(gm)
        assert ep is not None, phase
        assert ep.state_dict and all(t.data_ptr() in params for t in ep.state_dict.values())
        torch.manual_seed(0)
        args = [a.random_(3, 200) if i == 0 else a.normal_() if a.is_floating_point() else a
                for i, a in enumerate(example_inputs(g.ctx.signature, 3, 7, 32))]
        expected, got = gm(*[t.clone() for t in args]), ep.module()(*[t.clone() for t in args])
        assert len(expected) == len(got) > 1  # logits, then each new cache
        for x, y in zip(expected, got):
            torch.testing.assert_close(x, y, rtol=0, atol=0)

        next(n for n in gm.graph.nodes if n.target in (ATTENTION, PAGED_ATTENTION)).target = attention_grouped
        assert program_from_graph(gm) is None, phase
