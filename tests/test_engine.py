"""pdcompile.Engine: continuous batching with chunked prefill, checked token for token.

With greedy decoding every request must get exactly the tokens HF's generate() gives its
prompt alone, however the engine batched, chunked, shared, preempted or cancelled around it.
"""

import asyncio
import random
import threading

import pytest
import torch

import models
from conftest import optimized

import pdcompile
from pdcompile.engine import Engine, EngineFull, SamplingParams
from pdcompile.kv_cache import PagedKV
from pdcompile.runtime import OptimizedModel, Runner

BACKENDS = ["eager", "onnxruntime", pytest.param("inductor", marks=pytest.mark.slow)]
# shared with test_runtime's block-size test (same compiled graphs); every engine below gets its
# own pool (with_pool), so block counts are exact whatever other tests left in the model's pool
OPTIONS = dict(block_size=8)


@pytest.fixture(params=BACKENDS, scope="module")
def pair(request):
    return optimized("llama", request.param, **OPTIONS)


def fresh(pair_or_fast, blocks=64):
    fast = pair_or_fast[1] if isinstance(pair_or_fast, tuple) else pair_or_fast
    return with_pool(fast, blocks)


def prompts(seed, lengths):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, models.VOCAB, (n,), generator=g).tolist() for n in lengths]


def reference(hf, prompt, n):
    """HF eager generate() on the prompt alone, greedy: the new tokens."""
    ids = torch.tensor([prompt])
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                      pad_token_id=0)
    return out[0, len(prompt):].tolist()


def with_pool(fast: OptimizedModel, blocks: int) -> OptimizedModel:
    """The same compiled graphs over a pool of ``blocks`` blocks (the pool is a graph input)."""
    kv = fast.runner.kv
    small = PagedKV(kv.geometry, kv.device, kv.max_seq_len, num_blocks=blocks, block_size=kv.block_size,
                    prefix_cache=kv.prefix_cache)
    runner = Runner(small, fast.runner.executor, fast.runner.max_batch_size, fast.runner.vocab_size)
    return OptimizedModel(runner, fast.config, fast.generation_config, original_model=fast.original_model)


def drain(engine):
    while engine.has_work():
        engine.step()


def in_use(engine):
    return engine.stats()["kv_blocks_used"]


def test_staggered_arrivals_and_chunked_prefill(pair):
    hf, fast = pair
    engine = Engine(fresh(fast), max_prefill_tokens=16, max_num_seqs=3)
    ps = prompts(1, (5, 40, 70, 17, 33))
    streams = [engine.submit(ps[0], SamplingParams(max_tokens=12)), engine.submit(ps[1], SamplingParams(max_tokens=12))]
    for _ in range(3):
        engine.step()
    streams += [engine.submit(p, SamplingParams(max_tokens=12)) for p in ps[2:4]]
    engine.step()
    streams.append(engine.submit(ps[4], SamplingParams(max_tokens=12)))
    results = [s.result() for s in streams]
    for p, r in zip(ps, results):
        assert r.token_ids == reference(hf, p, 12)
        assert r.finish_reason in ("length", "stop")
    # the 70-token prompt alone needs 5 chunks of at most 16 tokens
    assert engine.counters["chunk_rows"] >= 5 + 4
    assert in_use(engine) == 0


def test_shared_prefix_is_computed_once(pair):
    hf, fast = pair
    engine = Engine(fresh(fast), max_prefill_tokens=64)
    shared = prompts(2, (32,))[0]
    ps = [shared + tail for tail in prompts(3, (5, 9, 12))]
    first = engine.submit(ps[0], SamplingParams(max_tokens=8)).result()
    hits = engine.counters["prefix_hit_tokens"]
    rest = engine.generate(ps[1:], SamplingParams(max_tokens=8))
    assert engine.counters["prefix_hit_tokens"] - hits >= 2 * 32  # both later prompts reused 4 blocks of 8
    for p, r in zip(ps, [first, *rest]):
        assert r.token_ids == reference(hf, p, 8)
    assert in_use(engine) == 0


def test_cancel_frees_blocks_at_once(pair):
    hf, fast = pair
    engine = Engine(fresh(fast), max_prefill_tokens=64)
    ps = prompts(4, (20, 30, 25))
    streams = [engine.submit(p, SamplingParams(max_tokens=40, ignore_eos=True)) for p in ps]
    for _ in range(4):
        engine.step()
    before = in_use(engine)
    assert engine.cancel(streams[1].request_id)
    assert in_use(engine) < before  # freed when cancel() returns, not at the next step
    assert not engine.cancel(streams[1].request_id)
    cancelled = streams[1].result()
    assert cancelled.finish_reason == "abort" and 0 < len(cancelled.token_ids) < 40
    for i in (0, 2):
        r = streams[i].result()
        want = reference(hf, ps[i], 40)
        assert r.token_ids == want[:len(r.token_ids)] and (len(r.token_ids) == 40 or r.token_ids[-1] == 2)
    assert in_use(engine) == 0


def test_tiny_pool_preempts_and_recomputes(pair):
    hf, fast = pair
    small = with_pool(fast, 13)  # 12 usable blocks of 8 tokens; four requests of up to 48 tokens
    engine = Engine(small, max_prefill_tokens=32)
    ps = prompts(5, (20, 24, 18, 28))
    results = engine.generate(ps, SamplingParams(max_tokens=20, ignore_eos=True))
    assert engine.counters["preemptions"] > 0
    for p, r in zip(ps, results):
        assert r.token_ids == reference(hf, p, 20)[:len(r.token_ids)]
        assert len(r.token_ids) == 20 or r.token_ids[-1] == 2
    assert in_use(engine) == 0


def test_sampling_params(pair):
    hf, fast = pair
    engine = Engine(fresh(fast), tokenizer=models.word_tokenizer())
    p = prompts(6, (12,))[0]
    want = reference(hf, p, 10)
    # top_k=1 samples the argmax
    assert engine.submit(p, SamplingParams(max_tokens=10, temperature=0.7, top_k=1, seed=3)).result().token_ids == want
    a, b, c = (engine.submit(p, SamplingParams(max_tokens=10, temperature=1.5, top_p=0.9, seed=s)).result().token_ids
               for s in (7, 7, 8))
    assert a == b and a != c
    stopped = engine.submit(p, SamplingParams(max_tokens=10, stop_token_ids=[want[3]])).result()
    assert stopped.token_ids == want[:want.index(want[3]) + 1] and stopped.finish_reason == "stop"
    tok = models.word_tokenizer()
    full = tok.decode(want, skip_special_tokens=True)
    stop = tok.decode(want[4:6])
    r = engine.submit(p, SamplingParams(max_tokens=10, stop=[stop])).result()
    assert r.finish_reason == "stop" and r.text == full[:full.find(stop)]
    streamed = list(engine.submit(p, SamplingParams(max_tokens=10, logprobs=True)))
    assert [t for o in streamed for t in o.token_ids] == want and streamed[-1].finished
    assert len(streamed) == len(want) and all(len(o.logprobs) == 1 and o.logprobs[0] <= 0 for o in streamed)
    assert "".join(o.text for o in streamed) == full


def test_threads_and_async(pair):
    hf, fast = pair
    engine = Engine(fresh(fast), max_prefill_tokens=16).start()
    ps = prompts(7, (9, 31, 14, 22))
    results = {}

    def client(i):
        results[i] = engine.submit(ps[i], SamplingParams(max_tokens=10)).result().token_ids

    threads = [threading.Thread(target=client, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()

    async def async_clients():
        streams = [engine.submit_async(ps[i], SamplingParams(max_tokens=10)) for i in (2, 3)]
        return [(await s.result()).token_ids for s in streams]

    results[2], results[3] = asyncio.run(async_clients())
    for t in threads:
        t.join()
    engine.shutdown()
    for i, p in enumerate(ps):
        assert results[i] == reference(hf, p, 10)
    assert in_use(engine) == 0


def soak(fast, n, seed):
    rng = random.Random(seed)
    engine = Engine(with_pool(fast, 40), max_prefill_tokens=24)
    streams, step = [], 0
    while len(streams) < n or engine.has_work():
        for _ in range(rng.choice((0, 0, 1, 2, 3))):
            if len(streams) < n:
                params = SamplingParams(max_tokens=rng.randint(1, 24), temperature=rng.choice((0.0, 0.8)),
                                        top_p=rng.choice((1.0, 0.9)), seed=rng.randint(0, 99))
                prompt = [rng.randrange(3, models.VOCAB) for _ in range(rng.randint(1, 60))]
                streams.append(engine.submit(prompt, params))
        if streams and rng.random() < 0.2:
            engine.cancel(rng.choice(streams).request_id)
        engine.step()
        step += 1
    finished = [s.result() for s in streams]
    assert all(r.finish_reason in ("stop", "length", "abort") for r in finished)
    assert any(r.finish_reason == "abort" for r in finished) and any(r.finish_reason == "length" for r in finished)
    stats = engine.stats()
    assert stats["kv_blocks_used"] == 0 and stats["running"] == 0 and stats["waiting"] == 0
    assert all(r == 0 for r in engine.pool.refs)


def test_soak_random_requests_and_cancels():
    soak(optimized("llama", "eager", **OPTIONS)[1], 100, seed=0)


@pytest.mark.slow
def test_soak_1000():
    soak(optimized("llama", "eager", **OPTIONS)[1], 1000, seed=1)


def test_bad_requests():
    fast = optimized("llama", "eager", **OPTIONS)[1]
    engine = Engine(fresh(fast), max_queue=2)
    with pytest.raises(ValueError, match="empty prompt"):
        engine.submit([])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.submit([1, models.VOCAB])
    with pytest.raises(pdcompile.CapacityError, match="max_seq_len=256"):
        engine.submit([5] * 250, SamplingParams(max_tokens=10))
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="tokenizer"):
        engine.submit([5], SamplingParams(stop=["x"]))
    with pytest.raises(ValueError, match="max_num_seqs"):
        Engine(fast, max_num_seqs=9)
    engine.submit([5]), engine.submit([6])
    with pytest.raises(EngineFull):
        engine.submit([7])
    engine.shutdown(cancel=True)
    assert in_use(engine) == 0


def test_generate_batch_matches_hf_generate():
    hf, fast = optimized("llama", "eager", **OPTIONS)
    from transformers import GenerationConfig
    from transformers.generation.continuous_batching import RequestStatus

    fast = fresh(fast)
    ps = prompts(8, (6, 45, 19))
    config = GenerationConfig(max_new_tokens=9, do_sample=False, eos_token_id=2, pad_token_id=0)
    out = fast.generate_batch(ps, generation_config=config)
    keys = list(out)
    assert len(keys) == 3 and keys[0].startswith("req_") and int(keys[1][4:]) == int(keys[0][4:]) + 1
    for p, key in zip(ps, keys):
        assert out[key].prompt_ids == p and out[key].status == RequestStatus.FINISHED and out[key].error is None
        assert out[key].generated_tokens == reference(hf, p, 9)
    # kwargs override the config; num_return_sequences forks children, listed before their parent
    sampled = fast.generate_batch(ps[:1], generation_config=GenerationConfig(do_sample=True, num_return_sequences=2),
                                  max_new_tokens=4)
    (child, parent), = [list(sampled)]
    assert child == f"{parent}__child#0" and all(len(o.generated_tokens) <= 4 for o in sampled.values())
    assert fast.generate_batch([]) == {}


@pytest.mark.slow
def test_generate_batch_matches_transformers_generate_batch():
    hf, fast = optimized("llama", "eager", **OPTIONS)
    from transformers import GenerationConfig

    ps = prompts(9, (7, 40, 66, 12))
    config = GenerationConfig(max_new_tokens=10, do_sample=False, eos_token_id=2, pad_token_id=0)
    theirs = hf.generate_batch(ps, generation_config=config)
    ours = fast.generate_batch(ps, generation_config=config)
    assert [o.generated_tokens for o in ours.values()] == [o.generated_tokens for o in theirs.values()]


def test_without_extend_graph_prompts_prefill_whole(pair):
    """A bundle carries prefill and decode only: prompts are prefilled in one piece, no prefix cache."""
    from pdcompile.executor import StepExecutor

    hf, fast = pair
    r = fast.runner
    phases = {k: v for k, v in r.executor.phases.items() if k in ("prefill", "decode")}
    kv = PagedKV(r.kv.geometry, r.kv.device, r.kv.max_seq_len, num_blocks=64, block_size=r.kv.block_size,
                 prefix_cache=True)
    bundle_like = OptimizedModel(Runner(kv, StepExecutor(phases), r.max_batch_size, r.vocab_size), fast.config,
                                 fast.generation_config)
    engine = Engine(bundle_like, max_prefill_tokens=16)
    assert not engine.can_extend and not engine.prefix_cache
    ps = prompts(10, (40, 7, 40))
    ps[2] = ps[0][:32] + ps[2][32:]  # a shared prefix: recomputed, not reused
    results = engine.generate(ps, SamplingParams(max_tokens=6))
    assert engine.counters["chunk_rows"] == 3 and engine.counters["prefix_hit_tokens"] == 0
    for p, res in zip(ps, results):
        assert res.token_ids == reference(hf, p, 6)
    assert in_use(engine) == 0


@pytest.mark.slow
def test_engine_on_an_onnx_bundle(tmp_path):
    hf, fast = optimized("llama", "eager", **OPTIONS)
    pdcompile.export(fast, tmp_path / "b", backend="onnxruntime")
    engine = Engine(str(tmp_path / "b"))
    ps = prompts(11, (30, 9))
    for p, r in zip(ps, engine.generate(ps, SamplingParams(max_tokens=8))):
        assert r.token_ids == reference(hf, p, 8)


def test_prompt_types():
    hf, fast = optimized("llama", "eager", **OPTIONS)
    engine = Engine(fresh(fast))
    import numpy as np

    p = prompts(12, (9,))[0]
    want = reference(hf, p, 4)
    assert engine.submit(np.array(p), SamplingParams(max_tokens=4)).result().token_ids == want
    assert engine.submit(torch.tensor(p), SamplingParams(max_tokens=4)).result().token_ids == want
    for bad in ([1.0, 2.0], "w1 w2", [True, 5]):
        with pytest.raises(TypeError, match="list of token ids"):
            engine.submit(bad)


def test_decodes_are_not_stalled_by_a_long_prompt(pair):
    hf, fast = pair
    engine = Engine(fresh(fast), max_prefill_tokens=16)
    short, long = prompts(13, (6, 100))
    a = engine.submit(short, SamplingParams(max_tokens=30, ignore_eos=True))
    engine.step()  # a's prompt, first token
    b = engine.submit(long, SamplingParams(max_tokens=3, ignore_eos=True))
    for step in range(100 // 16 + 1):  # b's prompt in 7 chunks of at most 16 tokens
        engine.step()
        assert len(a._queue.queue) == step + 2, "a decoding request must get a token at every step"
        assert b._queue.empty() == (step < 100 // 16)  # b's first token comes with its last chunk
    for stream, p, n in ((a, short, 30), (b, long, 3)):
        got, want = stream.result().token_ids, reference(hf, p, n)  # HF stops at eos; ignore_eos goes on
        assert len(got) == n and got[:len(want)] == want
