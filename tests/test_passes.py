"""Each pass: graph structure (what it removes, what it inserts, matches) and numbers
(logits and KV cache equal to the unpassed graph), at two prompt lengths and on a
padded batch, across the parity families."""

import os

import pytest
import torch

import models
import pdcompile
from pdcompile.capture import capture
from pdcompile.cost import estimate_cost
from pdcompile.passes import (
    DECODE_PIPELINE,
    PREFILL_PIPELINE,
    GraphPass,
    PassError,
    PassResult,
    run_pipeline,
)
from pdcompile.passes import decode_attention_mask, fuse_causal_mask, prune_final_layer
from pdcompile.passes.utils import ATTENTION, SDPA, backward_slice, sdpa_args
from pdcompile.phase import PassContext


class Captured:
    """A capture's graphs by phase name, with their signatures."""

    def __init__(self, model, max_batch_size, max_seq_len):
        cap = capture(model, max_batch_size, max_seq_len)
        self.geometry, self.max_seq_len = cap.geometry, max_seq_len
        self.prefill, self.decode = cap.graphs["prefill"][0], cap.graphs["decode"][0]
        self.sig = {phase: sig for phase, (_, sig) in cap.graphs.items()}

    def ctx(self, phase):
        return PassContext.make(self.sig[phase], max_seq_len=self.max_seq_len)

aten = torch.ops.aten
FAMILIES = sorted(models.FAMILIES)
ATOL, RTOL = 1e-4, 1e-4


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    model = models.build(request.param)
    # two independent captures: one stays as captured (the reference), one gets the passes
    return request.param, model, Captured(model, 8, 256), Captured(model, 8, 256)


def _count(gm, target):
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is target)


def _run_one(cap, gm, gpass, phase="prefill"):
    gm, records, _ = run_pipeline(gm, [gpass], cap.ctx(phase))
    return gm, records[0]


def _prefill_inputs(geometry, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    seq = max(lengths)
    ids = torch.randint(3, models.VOCAB, (len(lengths), seq), generator=g)
    last = torch.tensor(lengths) - 1
    return ids, last, geometry.allocate(len(lengths), seq + 8, "cpu")


def _compare_prefill(ref_gm, gm, geometry, lengths):
    ids, last, caches_a = _prefill_inputs(geometry, lengths)
    caches_b = [c.clone() for c in caches_a]
    with torch.no_grad():
        a = ref_gm(ids, last, *caches_a)
        b = gm(ids, last, *caches_b)
    torch.testing.assert_close(b, a, atol=ATOL, rtol=RTOL)
    for ca, cb in zip(caches_a, caches_b):  # the real positions of every row
        for row, n in enumerate(lengths):
            torch.testing.assert_close(cb[row, :, :n], ca[row, :, :n], atol=ATOL, rtol=RTOL)


def _mask_only_nodes(gm):
    """Names of the nodes that exist only to build attention masks."""
    sdpas = [n for n in gm.graph.nodes if n.target is SDPA]
    masks = [sdpa_args(s)["attn_mask"] for s in sdpas if sdpa_args(s)["attn_mask"] is not None]
    mask_slice = set().union(*(set(backward_slice(m)) for m in masks))
    # everything reachable from the outputs and cache writes without crossing a mask edge
    needed, stack = set(), [gm.graph.output_node()] + [
        n for n in gm.graph.nodes if n.target in (aten.index_copy_.default, aten.index_put_.default)]
    while stack:
        n = stack.pop()
        if n in needed:
            continue
        needed.add(n)
        if n.target is SDPA:
            stack.extend(sdpa_args(n)[k] for k in ("query", "key", "value"))
        else:
            stack.extend(n.all_input_nodes)
    return {n.name for n in mask_slice - needed if n.op == "call_function"}


def _full_matmuls_not_feeding_cache(gm):
    seq = next(n for n in gm.graph.nodes if n.name == "input_ids").meta["val"].shape[1].node.expr
    writes = [n for n in gm.graph.nodes if n.target is aten.index_copy_.default]
    feeding = set().union(*(set(backward_slice(w)) for w in writes))
    matmuls = [n for n in gm.graph.nodes if n.target in (aten.linear.default, aten.addmm.default, aten.mm.default)]
    full = [n for n in matmuls
            if any(isinstance(d, torch.SymInt) and seq in d.node.expr.free_symbols for d in n.meta["val"].shape)]
    return [n.name for n in full if n not in feeding]


# two prompt lengths at batch 1, and a padded batch of very different lengths
SHAPES = [[5], [37], [23, 4, 11]]


def test_fuse_causal_mask(family):
    name, model, ref, cap = family
    gm = cap.prefill
    sdpas = [n for n in gm.graph.nodes if n.target is SDPA]
    mask_nodes = _mask_only_nodes(gm)
    layers = cap.geometry.num_layers
    assert len(sdpas) == layers and mask_nodes
    gm, rec = _run_one(cap, gm, fuse_causal_mask.PASS)
    assert rec.matches == layers, rec.detail
    assert _count(gm, SDPA) == 0
    attn = [n for n in gm.graph.nodes if n.target is ATTENTION]
    assert len(attn) == layers and all(n.args[3] is None for n in attn), "prefill attention must be causal (q_pos None)"
    remaining = {n.name for n in gm.graph.nodes}
    assert not (mask_nodes & remaining), f"mask nodes left: {sorted(mask_nodes & remaining)[:5]}"
    # grouped-query attention reads the kv heads directly: no repeat_kv expand before attention
    assert all(n.args[1].target is not aten.reshape.default for n in attn)
    for lengths in SHAPES:
        _compare_prefill(ref.prefill, gm, cap.geometry, lengths)


def test_prune_final_layer(family):
    name, model, ref, cap = family
    gm, _ = _run_one(cap, cap.prefill, fuse_causal_mask.PASS)
    before = estimate_cost(gm, cap.sig["prefill"])
    gm, rec = _run_one(cap, gm, prune_final_layer.PASS)
    assert rec.matches == 1, rec.detail
    after = estimate_cost(gm, cap.sig["prefill"])
    # the output matmul (lm_head) now sees one position per row
    out = gm.graph.output_node().args[0]
    lm_head = out.args[0]
    assert lm_head.target is aten.linear.default and tuple(lm_head.meta["val"].shape[1:2]) == (1,)
    # the last layer's attention keeps one query per row, positioned at last_idx
    attn = [n for n in gm.graph.nodes if n.target is ATTENTION]
    pruned = [n for n in attn if n.args[3] is not None]
    assert len(pruned) == 1 and pruned[0].args[3].name == "last_idx"
    assert pruned[0].meta["val"].shape[2] == 1
    # FLOPs: at least the lm_head on S-1 positions are gone (vocab x hidden x 2 x 127)
    hidden, vocab = lm_head.args[1].meta["val"].shape[1], lm_head.args[1].meta["val"].shape[0]
    assert before["flops"] - after["flops"] >= 2 * vocab * hidden * 127
    # the goal, not just the minimum: every matmul still run on all S positions is one the
    # KV cache needs (an ancestor of a cache write); q/o projections, MLP, lm_head are not
    assert _full_matmuls_not_feeding_cache(ref.prefill), "the unpruned graph must have some"
    assert not _full_matmuls_not_feeding_cache(gm)
    for lengths in SHAPES:
        _compare_prefill(ref.prefill, gm, cap.geometry, lengths)


def test_decode_attention_mask(family):
    name, model, ref, cap = family
    gm = cap.decode
    layers = cap.geometry.num_layers
    mask_nodes = _mask_only_nodes(gm)
    assert mask_nodes
    gm, rec = _run_one(cap, gm, decode_attention_mask.PASS, phase="decode")
    assert rec.matches == layers, rec.detail
    assert _count(gm, SDPA) == 0
    attn = [n for n in gm.graph.nodes if n.target is ATTENTION]
    assert len(attn) == layers and all(n.args[3] is not None and n.args[3].name == "pos" for n in attn)
    assert not (mask_nodes & {n.name for n in gm.graph.nodes})
    # numbers: three rows at very different positions, caches filled with history
    g = torch.Generator().manual_seed(3)
    pos = torch.tensor([0, 17, 40])
    caches_a = [torch.randn(c.shape[0], c.shape[1], 48, c.shape[3], generator=g)
                for c in cap.geometry.allocate(3, 48, "cpu")]
    caches_b = [c.clone() for c in caches_a]
    ids = torch.randint(3, models.VOCAB, (3, 1), generator=g)
    with torch.no_grad():
        a = ref.decode(ids, pos, *caches_a)
        b = gm(ids, pos, *caches_b)
    torch.testing.assert_close(b, a, atol=ATOL, rtol=RTOL)
    for ca, cb in zip(caches_a, caches_b):
        torch.testing.assert_close(cb, ca, atol=ATOL, rtol=RTOL)


# ------------------------------------------------------------------ manager and report

def test_pipelines_are_explicit_ordered_lists():
    assert [p.name for p in PREFILL_PIPELINE] == ["remove_noops", "fuse_causal_mask", "prune_final_layer", "paged_kv",
                                                  "quantize_weights", "bf16_matmuls"]
    assert [p.name for p in DECODE_PIPELINE] == ["remove_noops", "decode_attention_mask", "paged_kv", "quantize_weights"]


def test_disable_pass_by_name_and_report():
    model = models.build("llama")
    fast = pdcompile.optimize(model, backend="eager", max_seq_len=128, disable_passes=("prune_final_layer",))
    report = fast.pdcompile_report()
    recs = {r.name: r for r in report.phases["prefill"]}
    assert recs["prune_final_layer"].status == "disabled"
    assert recs["fuse_causal_mask"].status == "applied"
    text = str(report)
    assert "prune_final_layer" in text and "disabled" in text and "decode_attention_mask" in text
    ids, mask = models.left_padded_batch()
    ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0)
    assert torch.equal(fast.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0), ref)


def test_report_flops_drop_by_the_pruning_prediction():
    model = models.build("llama")
    fast = pdcompile.optimize(model, backend="eager", max_seq_len=256)
    report = fast.pdcompile_report()
    prune = next(r for r in report.phases["prefill"] if r.name == "prune_final_layer")
    # Prediction for the last layer: q/o projections, MLP and lm_head on 127 of 128 positions,
    # and the last layer's attention for 127 queries.
    c = model.config
    hd = c.hidden_size // c.num_attention_heads
    per_token = 2 * (c.hidden_size * c.hidden_size * 2 + 3 * c.hidden_size * c.intermediate_size
                     + c.hidden_size * c.vocab_size)
    attention = 4 * c.num_attention_heads * hd * (128 * 128 // 2 - 128)
    predicted = per_token * 127 + attention
    saved = prune.cost_before["flops"] - prune.cost_after["flops"]
    assert abs(saved - predicted) / predicted < 0.02, (saved, predicted)
    assert next(r for r in report.to_dict()["phases"]["prefill"] if r["name"] == "prune_final_layer")["matches"] == 1


def test_pass_failure_names_pass_and_predecessors():
    model = models.build("llama")
    cap = Captured(model, 4, 64)

    def boom(gm, ctx):
        raise RuntimeError("kaboom")

    pipeline = [fuse_causal_mask.PASS, GraphPass("exploding_pass", boom)]
    with pytest.raises(PassError, match=r"pass 'exploding_pass' failed on the prefill graph \(passes run before it: fuse_causal_mask\): kaboom"):
        run_pipeline(cap.prefill, pipeline, cap.ctx("prefill"))


def test_graph_dumps(tmp_path, monkeypatch):
    monkeypatch.setenv("PDCOMPILE_DUMP_DIR", str(tmp_path))
    cap = Captured(models.build("llama"), 4, 64)
    run_pipeline(cap.prefill, PREFILL_PIPELINE, cap.ctx("prefill"))
    files = sorted(os.listdir(tmp_path / "prefill"))
    assert files == ["00_captured_graph.txt", "01_remove_noops_after.txt", "02_fuse_causal_mask_after.txt",
                     "03_prune_final_layer_after.txt", "04_paged_kv_after.txt", "05_quantize_weights_after.txt",
                     "06_bf16_matmuls_after.txt"]
    assert "scaled_dot_product_attention" in (tmp_path / "prefill" / files[0]).read_text()
    assert "pdcompile.attention" in (tmp_path / "prefill" / files[2]).read_text()
    assert "pool_0" in (tmp_path / "prefill" / files[4]).read_text()


def test_non_sdpa_attention_reported_not_silent():
    """A model captured with eager attention: the attention passes say why they did not match."""
    model = models.build("qwen2")
    cfg = pdcompile.OptimizeConfig(backend="eager", cache=pdcompile.CacheConfig(max_seq_len=128))
    captured, graphs, report, _ = pdcompile.api.transform(model, cfg, 128, {}, attn_implementation="eager")
    fuse = next(r for r in report.phases["prefill"] if r.name == "fuse_causal_mask")
    assert fuse.status == "no match" and "attention is not SDPA" in fuse.detail
    dec = next(r for r in report.phases["decode"] if r.name == "decode_attention_mask")
    assert dec.status == "no match" and "attention is not SDPA" in dec.detail
    # the graphs still compute the right thing
    ids, last, caches = _prefill_inputs(captured.geometry, [9])
    with torch.no_grad():
        logits = graphs["prefill"].gm(ids, last, *caches)
        ref = model(input_ids=ids).logits[:, -1]
    torch.testing.assert_close(logits, ref, atol=ATOL, rtol=RTOL)


def test_non_causal_mask_raises():
    """A mask that is not what the prefill contract says must not be fused silently."""
    cap = Captured(models.build("llama"), 4, 64)
    gm = cap.prefill
    sdpa = next(n for n in gm.graph.nodes if n.target is SDPA)
    mask = sdpa_args(sdpa)["attn_mask"]
    with gm.graph.inserting_after(mask):  # flip the mask: attend to the future instead
        flipped = gm.graph.call_function(aten.transpose.int, (mask, 2, 3))
    for s in [n for n in gm.graph.nodes if n.target is SDPA]:
        s.args = s.args[:3] + (flipped,) + s.args[4:]
    gm.recompile()
    with pytest.raises(PassError, match="not causal for real tokens"):
        run_pipeline(gm, [fuse_causal_mask.PASS], cap.ctx("prefill"))


def test_passes_on_vs_off_same_tokens_end_to_end():
    model = models.build("phi3")
    ids, mask = models.left_padded_batch()
    ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=32, do_sample=False, pad_token_id=0)
    from pdcompile.passes import ALL_PASSES

    off = pdcompile.optimize(model, backend="eager", max_seq_len=128, disable_passes=tuple(ALL_PASSES))
    on = pdcompile.optimize(model, backend="eager", max_seq_len=128)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=32, do_sample=False, pad_token_id=0)
    assert torch.equal(off.generate(**kw), ref)
    assert torch.equal(on.generate(**kw), ref)
    assert all(r.status == "disabled" for recs in off.pdcompile_report().phases.values() for r in recs)


def test_pass_result_is_frozen():
    with pytest.raises(Exception):
        PassResult(None, 0).matches = 3


@pytest.mark.parametrize("phase", ["prefill", "decode", "extend"])
def test_incremental_metadata_equals_a_full_refresh(phase):
    """The manager refreshes the fake values of what each pass changed only: after the whole
    pipeline every node's value (shape, stride, dtype, device) is what a full propagation
    computes, and every node has one."""
    from pdcompile.api import PIPELINES
    from pdcompile.passes.manager import _meta_key, refresh_meta

    model = models.build("llama")
    gm, sig = capture(model, 8, 256, phases=(phase,)).graphs[phase]
    gm, records, _ = run_pipeline(gm, PIPELINES[phase], PassContext.make(sig, max_seq_len=256))
    assert sum(r.matches for r in records) >= 3  # the graph was rewritten several times
    kept = {n.name: _meta_key(n.meta["val"]) for n in gm.graph.nodes if n.op != "output"}
    refresh_meta(gm, full=True)
    assert kept == {n.name: _meta_key(n.meta["val"]) for n in gm.graph.nodes if n.op != "output"}


@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_cost_estimate_counts_the_flops_torch_counts(phase):
    """The estimate (symbolic shapes evaluated at the report shape, no run) counts the
    matmul and attention FLOPs torch's FlopCounterMode counts when the captured graph runs
    at that shape (attention with an explicit mask: the full score matrix, as estimated)."""
    from torch.utils.flop_counter import FlopCounterMode

    from pdcompile.cost import REPORT_SHAPE, example_inputs

    model = models.build("llama")
    gm, sig = capture(model, 8, 256, phases=(phase,)).graphs[phase]
    inputs = example_inputs(sig, REPORT_SHAPE["batch"], REPORT_SHAPE["prompt"], REPORT_SHAPE["capacity"])
    # the math attention: its matmuls are what the counter sees (it does not count CPU flash attention)
    with torch.no_grad(), torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH), \
            FlopCounterMode(display=False) as counter:
        gm(*inputs)
    estimate = estimate_cost(gm, sig)
    assert estimate["flops"] == counter.get_total_flops() > 0
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())  # RoPE's frequencies: the graph reads one
    assert params <= estimate["weight_bytes"] <= params + buffers


def test_metadata_refresh_runs_each_distinct_rewrite_once():
    """A pass rewrites every layer the same way; the manager's refresh runs the fake kernel
    once per distinct rewrite, so doubling the layers adds no fake-kernel runs (in-place
    cache writes, whose value is their own input, run per layer)."""
    import transformers as tf
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    from pdcompile.api import PIPELINES
    from pdcompile.passes.manager import _writes_its_input

    runs = []
    counting = FakeTensorProp.run_node

    def run_node(self, n):
        if n.op == "call_function" and not _writes_its_input(n.target):
            runs.append(n.target)
        return counting(self, n)

    counts = {}
    for layers in (2, 4):
        torch.manual_seed(0)
        model = tf.LlamaForCausalLM(tf.LlamaConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=models.VOCAB, initializer_range=0.1, max_position_embeddings=512)).eval()
        gm, sig = capture(model, 8, 256, phases=("decode",)).graphs["decode"]
        runs.clear()
        FakeTensorProp.run_node = run_node
        try:
            _, records, _ = run_pipeline(gm, PIPELINES["decode"], PassContext.make(sig, max_seq_len=256))
        finally:
            FakeTensorProp.run_node = counting
        assert sum(r.matches for r in records) >= 2 * layers  # every layer was rewritten
        counts[layers] = len(runs)
    assert 0 < counts[4] == counts[2], counts
