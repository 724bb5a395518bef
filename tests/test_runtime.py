"""The phase contract and the runtime's three parts: block sizes, threads, KV lifetime, roles.

Every backend runs the same checks: greedy tokens identical to HF eager (logits within
fp32 tolerance) at block sizes other than the default, and two threads sharing one model.
"""

import threading

import pytest
import torch

import models
import pdcompile
import test_parity
from conftest import optimized
from pdcompile.capture import capture
from pdcompile.passes import DECODE_PIPELINE, PREFILL_PIPELINE, run_pipeline
from pdcompile.phase import PHASES, PassContext, PhaseSignature, Role

BACKENDS = ["eager", "inductor", "onnxruntime"]
KW = dict(do_sample=False, pad_token_id=0)


@pytest.mark.parametrize("block_size,backend", [(8, b) for b in BACKENDS] + [
    (32, "eager"), pytest.param(32, "inductor", marks=pytest.mark.slow), (32, "onnxruntime")])
def test_block_sizes_match_hf(block_size, backend):
    """Blocks of 8 and 32 tokens (16 is the default every other test runs): a left-padded batch
    whose rows cross many block boundaries, then a prefix-cache hit that starts mid-prompt."""
    model, fast = optimized("llama", backend, block_size=block_size)
    assert fast.runner.kv.block_size == block_size
    assert all(g.ctx.signature.block_size == block_size for g in fast.graphs.values())
    ids, mask = models.left_padded_batch(lengths=(37, 6, 19))
    kw = dict(max_new_tokens=48, return_dict_in_generate=True, output_logits=True, **KW)
    ref = model.generate(input_ids=ids, attention_mask=mask, **kw)
    out = fast.generate(input_ids=ids, attention_mask=mask, **kw)
    assert torch.equal(ref.sequences, out.sequences)
    for a, b in zip(ref.logits, out.logits):
        torch.testing.assert_close(b, a, atol=test_parity.ATOL, rtol=test_parity.RTOL)
    # the same first row again: its full blocks come from the prefix cache (extend graph)
    row = ids[:1, ids.shape[1] - 37:]
    again = fast.generate(input_ids=row, max_new_tokens=24, **KW)
    assert fast.last_timings.reused_tokens == ((37 - 1) // block_size * block_size,)
    assert torch.equal(again, model.generate(input_ids=row, max_new_tokens=24, **KW))


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_threads_twenty_calls_each(backend):
    """Concurrent generate() calls on one model give the tokens sequential calls give."""
    model, fast = optimized("llama", backend)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, models.VOCAB, (1 + i % 3, 4 + (7 * i) % 23), generator=g) for i in range(40)]
    expected = [fast.generate(input_ids=p, max_new_tokens=6 + i % 5, **KW) for i, p in enumerate(prompts)]
    results: dict[int, torch.Tensor] = {}
    errors = []

    def worker(indices):
        try:
            for i in indices:
                results[i] = fast.generate(input_ids=prompts[i], max_new_tokens=6 + i % 5, **KW)
        except Exception as e:  # noqa: BLE001 - reported below with the thread's inputs
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(range(t, 40, 2),)) for t in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors
    assert sorted(results) == list(range(40))
    for i in range(40):
        assert torch.equal(results[i], expected[i]), f"call {i} differs from the sequential call"
    assert fast.runner.kv.pool.stats()["in_use"] == 0


def test_forward_cache_release_is_deterministic(llama_eager):
    _, fast = llama_eager
    pool = fast.runner.kv.pool
    ids = torch.randint(3, models.VOCAB, (2, 21))
    out = fast(input_ids=ids, logits_to_keep=1)
    cache = out.cache if "cache" in out else out.past_key_values
    held = pool.stats()["in_use"]
    assert held >= 4  # two rows of 22 positions in 16-token blocks
    cache.release()  # no garbage collector involved
    assert pool.stats()["in_use"] == 0
    with pytest.raises(ValueError, match="this cache was released"):
        fast(input_ids=torch.tensor([[5], [6]]), cache=cache)
    with fast(input_ids=ids, logits_to_keep=1)[1] as cache2:  # tuple form: (logits, cache)
        assert pool.stats()["in_use"] == held
    assert pool.stats()["in_use"] == 0


def test_passes_find_inputs_by_role_not_name():
    """Rename every captured input: the passes make the same rewrites (they read the signature)."""
    model = models.build("qwen2")
    plain, renamed = capture(model, 4, 128), capture(model, 4, 128)
    for phase, pipeline in (("prefill", PREFILL_PIPELINE), ("decode", DECODE_PIPELINE)):
        gm, sig = renamed.graphs[phase]
        for i, node in enumerate(gm.graph.find_nodes(op="placeholder")):
            node.name = node.target = f"arg{i}_anonymous"
        gm.recompile()
        _, want, want_ctx = run_pipeline(plain.graphs[phase][0], pipeline, PassContext.make(plain.graphs[phase][1]))
        got_gm, got, got_ctx = run_pipeline(gm, pipeline, PassContext.make(sig))
        assert [(r.name, r.matches) for r in got] == [(r.name, r.matches) for r in want]
        # every pass matches except remove_noops and those the config turns on (weights=, prefill_dtype=)
        assert all(r.matches for r in got if r.name not in ("remove_noops", "quantize_weights", "bf16_matmuls")), [(r.name, r.detail) for r in got]
        assert got_ctx.signature == want_ctx.signature
        got_ctx.signature.nodes(got_gm)  # the rewritten graph's inputs are the signature's


def test_signature_round_trips_through_json():
    _, fast = optimized("llama", "eager")
    for g in fast.graphs.values():
        sig = g.ctx.signature
        assert PhaseSignature.from_dict(sig.to_dict()) == sig
        assert [s.role for s in sig.inputs[:2]] == [Role.TOKENS, PHASES[sig.phase].row_inputs[0]]


def test_backend_options_are_typed():
    from pdcompile.backends import get_backend
    from pdcompile.backends.onnxruntime import OrtOptions

    assert get_backend("onnxruntime", OrtOptions(threads=1)).options.threads == 1
    with pytest.raises(TypeError, match="takes OrtOptions options"):
        get_backend("onnxruntime", {"threads": 1})
    model = models.build("llama")
    fast = pdcompile.optimize(model, config=pdcompile.OptimizeConfig(
        backend="onnxruntime", cache=pdcompile.CacheConfig(max_seq_len=64), backend_options=OrtOptions(threads=1)))
    assert fast.runner.executor.phases["decode"][0].session.get_session_options().intra_op_num_threads == 1
    ids = torch.randint(3, models.VOCAB, (1, 9))
    assert torch.equal(fast.generate(input_ids=ids, max_new_tokens=8, **KW),
                       model.generate(input_ids=ids, max_new_tokens=8, **KW))


def test_onnxruntime_writes_the_pool_in_place():
    """Each KV pool input feeds only its ScatterND (identity transposes removed), so the
    updated pool is bound to the input's own buffer: no copy of the cache per step."""
    _, fast = optimized("llama", "onnxruntime")
    for name in ("prefill", "decode"):
        phase = fast.runner.executor.phases[name][0]
        assert phase.alias and all(phase.alias.values()), (name, phase.alias)
