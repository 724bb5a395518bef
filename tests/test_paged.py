"""Paged KV cache: the pass (structure + numbers), the block pool, prefix caching."""

import pytest
import torch
import transformers as tf

import models
import pdcompile
from conftest import optimized
from pdcompile.capture import capture, capture_phase
from pdcompile.kv_pool import BlockPool, KVPoolExhausted, block_hashes
from pdcompile.passes import DECODE_PIPELINE, EXTEND_PIPELINE, PREFILL_PIPELINE, run_pipeline
from pdcompile.phase import PassContext, Role

aten = torch.ops.aten
KW = dict(do_sample=False, pad_token_id=0)


# ------------------------------------------------------------------ the pass

@pytest.mark.parametrize("family,block_size", [(f, 16) for f in sorted(models.FAMILIES)] + [("llama", 8), ("gpt2", 32)])
def test_paged_pass_structure(family, block_size):
    model = models.build(family)
    cap = capture(model, 4, 128)
    graphs = {"prefill": (*cap.graphs["prefill"], PREFILL_PIPELINE), "decode": (*cap.graphs["decode"], DECODE_PIPELINE),
              "extend": (*capture_phase(model, "extend", 4, 128, cap.geometry), EXTEND_PIPELINE)}
    for phase, (gm, signature, pipeline) in graphs.items():
        ctx = PassContext.make(signature, max_batch_size=4, max_seq_len=128, block_size=block_size)
        gm, records, ctx = run_pipeline(gm, pipeline, ctx)
        rec = next(r for r in records if r.name == "paged_kv")
        assert rec.matches == 2 * cap.geometry.num_layers, rec.detail
        # the signature says what the graph now takes, and the graph's inputs are exactly that
        sig = ctx.signature
        assert sig.is_paged and sig.block_size == block_size and not sig.has(Role.CACHE)
        nodes = sig.nodes(gm)
        assert len(nodes[Role.BLOCK_TABLE]) == 1 and len(nodes[Role.SLOT_MAPPING]) == 1
        pools = nodes[Role.POOL]
        assert len(pools) == 2 * cap.geometry.num_layers
        assert all(p.meta["val"].shape[1] == block_size for p in pools)
        # no contiguous cache update ops: every write is a scatter into a pool's slots
        assert not any(n.target is aten.index_copy_.default for n in gm.graph.nodes)
        writes = [n for n in gm.graph.nodes if n.target is aten.index_put_.default]
        assert {w.args[0] for w in writes} == set(pools) and all(len(w.args[1]) == 2 for w in writes)
        # decode and extend attention read the pools through the block table, no gathered copy
        paged = [n for n in gm.graph.nodes if n.target is torch.ops.pdcompile.paged_attention.default]
        gathers = [n for n in gm.graph.nodes if n.target is aten.index.Tensor and n.args[1][0] is nodes[Role.BLOCK_TABLE][0]]
        assert len(paged) == (0 if phase == "prefill" else cap.geometry.num_layers) and not gathers
        assert all(n.args[1] in writes and n.args[3] is nodes[Role.BLOCK_TABLE][0] for n in paged)


def test_contiguous_cache_still_available():
    model, fast = optimized("qwen3", "eager", paged=False)
    assert not fast.runner.paged
    ids, mask = models.left_padded_batch(lengths=(17, 4, 9))
    ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=32, **KW)
    assert torch.equal(fast.generate(input_ids=ids, attention_mask=mask, max_new_tokens=32, **KW), ref)


def test_paged_mixed_lengths_use_fewer_blocks():
    model, fast = optimized("llama", "eager")
    ids, mask = models.left_padded_batch(lengths=(120, 5, 20))
    ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, **KW)
    runner = fast.runner
    seqs = runner.start(*__import__("pdcompile").generation.pack_left_padded(ids, mask), 8)
    try:
        owned = [len(b) for b in seqs.blocks]
        assert owned == [8, 1, 2]  # ceil((len + 8) / 16): no row padded to the longest
    finally:
        runner.finish(seqs)
    assert torch.equal(fast.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, **KW), ref)


# ------------------------------------------------------------------ the block pool

def test_block_pool_refcounts_and_lru():
    pool = BlockPool(num_blocks=6, block_size=4)
    a = pool.allocate(3)
    assert 0 not in a and pool.available() == 2
    hashes = block_hashes(list(range(12)), 4, 12)
    for block, h in zip(a, hashes):
        pool.register(block, h)
    pool.release(a)  # registered: cached, not freed
    assert pool.stats()["cached"] == 3 and pool.available() == 5
    hit = pool.lookup(hashes[:2])
    assert hit == a[:2] and pool.stats()["in_use"] == 2
    pool.release(hit)
    b = pool.allocate(5)  # needs the 3 cached blocks back: least recently used go first
    assert len(set(b)) == 5 and pool.lookup(hashes) == []
    with pytest.raises(KVPoolExhausted, match="out of blocks: 1 more needed, 0 free of 5"):
        pool.allocate(1)
    with pytest.raises(RuntimeError, match="released more often"):
        pool.release([b[0], b[0]])


def test_hash_chain_depends_on_position():
    a = block_hashes([1, 2, 3, 4, 5, 6, 7, 8], 4, 8)
    b = block_hashes([9, 9, 9, 9, 5, 6, 7, 8], 4, 8)
    assert a[1] != b[1], "the same tokens after a different prefix are a different block"


# ------------------------------------------------------------------ prefix caching

@pytest.fixture(scope="module")
def long_llama():
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=models.VOCAB, initializer_range=0.1, max_position_embeddings=1024)).eval()
    return model, pdcompile.optimize(model, backend="eager", max_seq_len=1024, max_batch_size=4)


def test_prefix_cache_512_tokens(long_llama):
    model, fast = long_llama
    g = torch.Generator().manual_seed(1)
    system = torch.randint(3, models.VOCAB, (1, 512), generator=g)
    q1 = torch.cat([system, torch.randint(3, models.VOCAB, (1, 9), generator=g)], 1)
    q2 = torch.cat([system, torch.randint(3, models.VOCAB, (1, 14), generator=g)], 1)
    cold = pdcompile.optimize(model, backend="eager", max_seq_len=1024, prefix_cache=False)
    fast.generate(input_ids=q1, max_new_tokens=4, **KW)
    out = fast.generate(input_ids=q2, max_new_tokens=24, **KW)
    assert fast.last_timings.reused_tokens == (512,)
    assert torch.equal(out, cold.generate(input_ids=q2, max_new_tokens=24, **KW))
    assert cold.last_timings.reused_tokens == (0,)
    assert torch.equal(out, model.generate(input_ids=q2, max_new_tokens=24, **KW))
    report = fast.pdcompile_report().phases["extend"]
    assert {r.name: r.status for r in report}["decode_attention_mask"] == "applied"


def test_shared_blocks_do_not_leak_later_tokens(long_llama):
    model, fast = long_llama
    g = torch.Generator().manual_seed(2)
    prefix = torch.randint(3, models.VOCAB, (1, 48), generator=g)
    fast.generate(input_ids=torch.cat([prefix, torch.tensor([[7]])], 1), max_new_tokens=2, **KW)
    tails = [torch.randint(3, models.VOCAB, (1, n), generator=g) for n in (3, 11)]
    prompts = [torch.cat([prefix, t], 1) for t in tails]
    width = max(p.shape[1] for p in prompts)
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - p.shape[1]:] = p
        mask[row, width - p.shape[1]:] = 1
    out = fast.generate(input_ids=ids, attention_mask=mask, max_new_tokens=20, **KW)
    assert fast.last_timings.reused_tokens == (48, 48)  # both rows point at the same three blocks
    for row, p in enumerate(prompts):
        alone = model.generate(input_ids=p, max_new_tokens=20, **KW)
        assert torch.equal(out[row, width:], alone[0, p.shape[1]:]), f"row {row} saw the other row's tokens"


def test_no_block_leak_after_1000_calls(long_llama):
    model, fast = long_llama
    pool = fast.runner.kv.pool
    g = torch.Generator().manual_seed(3)
    prefixes = [torch.randint(3, models.VOCAB, (1, 40), generator=g) for _ in range(5)]
    for i in range(1000):
        ids = torch.cat([prefixes[i % 5], torch.randint(3, models.VOCAB, (1, 1 + i % 7), generator=g)], 1)
        fast.generate(input_ids=ids, max_new_tokens=1 + i % 3, **KW)
        if i % 100 == 0:
            assert pool.stats()["in_use"] == 0
    stats = pool.stats()
    assert stats["in_use"] == 0
    assert stats["free"] + stats["cached"] == stats["blocks"]
    # forward() caches give their blocks back when dropped
    out = fast(input_ids=prefixes[0], logits_to_keep=1)
    assert pool.stats()["in_use"] > 0
    del out
    import gc

    gc.collect()
    assert pool.stats()["in_use"] == 0


def test_pool_exhaustion_is_clear_and_harmless():
    model = models.build("llama")
    fast = pdcompile.optimize(model, backend="eager", max_seq_len=256, kv_cache_memory=1)  # -> 2 blocks
    assert fast.runner.kv.pool.num_blocks == 2
    ids = torch.randint(3, models.VOCAB, (1, 40))
    with pytest.raises(KVPoolExhausted, match="kv_cache_memory"):
        fast.generate(input_ids=ids, max_new_tokens=4, **KW)
    assert fast.runner.kv.pool.stats()["in_use"] == 0
    small = torch.randint(3, models.VOCAB, (1, 5))
    ref = model.generate(input_ids=small, max_new_tokens=8, **KW)
    assert torch.equal(fast.generate(input_ids=small, max_new_tokens=8, **KW), ref)
