"""``pdcompile bench`` end to end on a tiny llama: every system runs and matches HF eager,
the floors and ratios are filled in, the KV experiments say what they measured.

Numbers from this test are not benchmarks (tiny model, one round); it checks that the
benchmark measures what it says it does.
"""

import json
import math

import models
import pytest
import torch

from conftest import optimized

from pdcompile import bench


def test_bench_runs_every_system_and_the_kv_experiments(tmp_path):
    model = models.build("llama")
    cfg = bench.BenchConfig(
        model="tiny-llama", prompt_len=24, new_tokens=8, batches=(1, 2), repeats=1,
        backends=("onnxruntime",), peers=("hf-eager",), passes_off=False, contiguous=True,
        sweep_prompts=(16, 48), position_tokens=8, max_seq_len=256, prefix_len=64,
    )
    data = bench.run(model, cfg)

    names = [r["name"] for r in data["results"]]
    assert names == ["pdcompile[onnxruntime]", "pdcompile[onnxruntime] (contiguous KV)", "hf-eager"]
    for r in data["results"]:
        assert r["error"] is None, r
        assert r["tokens_match_hf"] is True, r["name"]
        assert r["ttft_ms"] > 0 and r["tpot_ms"] > 0
        assert math.isfinite(r["ttft_ratio"]) and math.isfinite(r["tpot_ratio"])
        assert set(r["tokens_per_s"]) == {"1", "2"}
        assert set(r["ttft_by_prompt_ms"]) == {"16", "48"}
        assert len(r["tpot_by_position_ms"]) == 7  # 8 new tokens: 7 decode gaps
    lim = data["limits"]
    assert lim["memory_bandwidth_GBps"] > 0 and lim["matmul_GFLOPps"] > 0
    assert lim["decode_floor_ms"] > 0 and lim["prefill_floor_ms"] > 0

    kv = data["kv_memory"]
    assert kv["tokens_identical"]
    assert kv["prompt_lengths"] == [24, 100]  # 300 and 700 do not fit max_seq_len=256
    # paged holds whole 16-token blocks per row; contiguous sizes both rows for the longer one
    per_token = kv["live_token_bytes"] // sum(n + 8 for n in kv["prompt_lengths"])
    assert kv["paged_bytes"] == sum(-(-(n + 8) // 16) * 16 for n in kv["prompt_lengths"]) * per_token
    assert kv["live_token_bytes"] <= kv["paged_bytes"] < kv["contiguous_bytes"]

    pc = data["prefix_cache"]
    assert pc["reused_tokens"] == 64 and pc["tokens_match_hf"]
    assert pc["cold_ttft_ms"] > 0 and pc["cached_ttft_ms"] > 0

    table = bench.markdown_table(data)
    for name in names:
        assert f"| {name} |" in table
    assert "Prefix cache" in table and "| contiguous |" in table
    path = tmp_path / "b.json"
    bench.save_json(data, str(path))
    assert json.loads(path.read_text())["results"][0]["name"] == names[0]
    bench.plot(data, str(tmp_path / "b.png"))
    assert (tmp_path / "b.png").stat().st_size > 10_000


def _word_tokenizer(vocab: int):
    """A tokenizer whose decode -> encode round trip is exact: token i is the word "w<i:04d>"."""
    from tokenizers import Tokenizer, models as tm, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # fixed-width words: a reloaded tokenizer that matches greedily still finds whole words
    tok = Tokenizer(tm.WordLevel({f"w{i:04d}": i for i in range(vocab)}, unk_token="w0000"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0000", eos_token="w0001")


def test_serve_load_benchmark_smoke(tmp_path):
    """`pdcompile bench --serve` machinery on a tiny model: every system serves the same trace in full,
    transformers serve included (a child process over HTTP, from the model saved as a folder)."""
    from pdcompile import serve_bench

    hf, fast = optimized("llama", "eager", block_size=8)  # shared with test_runtime, test_engine
    folder = tmp_path / "tiny-llama"
    hf.save_pretrained(folder)
    tokenizer = _word_tokenizer(hf.config.vocab_size)
    tokenizer.save_pretrained(folder)
    cfg = serve_bench.LoadConfig(model=str(folder), rates=(4.0,), num_requests=6, prompt_median=20,
                                 prompt_range=(4, 80), output_median=8, output_range=(2, 16), backend="eager",
                                 max_batch_size=4, max_prefill_tokens=32)
    a, b = serve_bench.trace(cfg, 4.0, 256), serve_bench.trace(cfg, 4.0, 256)
    assert a == b and len(a) == 6 and a[0].at == 0 and all(x.at <= y.at for x, y in zip(a, a[1:]))
    data = serve_bench.run(hf, cfg, fast=fast)
    assert [r["system"] for r in data["results"]] == list(serve_bench.SYSTEMS)
    for r in data["results"]:
        assert r["requests"] == 6 and r["full_outputs"], r["system"]
        assert r["output_tokens_per_s"] > 0 and 0 < r["ttft_p50_s"] <= r["ttft_p99_s"]
        assert 0 < r["tpot_p50_s"] <= r["tpot_p99_s"] and r["goodput_rps"] >= 0
    served = next(r for r in data["results"] if r["system"] == "transformers-serve")
    # the word tokenizer round-trips: the server saw the trace's prompts token for token
    assert [rec["prompt_tokens"] for rec in served["records"]] == [len(x.prompt) for x in a]
    serve_bench.save_json(data, tmp_path / "load.json")
    assert json.loads((tmp_path / "load.json").read_text())["config"]["seed"] == 0
    assert "| pdcompile-engine | 4.0 |" in serve_bench.markdown_table(data)


def test_serve_load_benchmark_refuses_transformers_serve_without_a_folder():
    from pdcompile import serve_bench

    cfg = serve_bench.LoadConfig(model="r1", systems=("transformers-serve",))
    with pytest.raises(ValueError, match="needs a model folder with a tokenizer"):
        serve_bench.run(None, cfg)


def test_bench_builds_the_engines_quantized_rows_and_ignore_eos():
    """--peers ENGINE expands to its variants, ENGINE:VARIANT to one; --weights adds quantized
    pdcompile rows; ignore_eos reaches every system (nothing is converted or compiled here)."""
    model = models.build("llama")
    cfg = bench.BenchConfig(backends=("eager",), peers=("hf-eager", "llama-cpp", "ort-genai:int4"), weights=("int8",),
                            passes_off=False, contiguous=False, ignore_eos=True, max_seq_len=256)
    systems = bench.build_systems(model, cfg, tokenizer=None)
    assert [s.name for s in systems] == [
        "pdcompile[eager]", "pdcompile[onnxruntime, int8]", "hf-eager",
        "llama-cpp[f32]", "llama-cpp[q8_0]", "llama-cpp[q4_0]", "ort-genai[int4]",
    ]
    assert all(s.ignore_eos for s in systems)
    bad = bench.BenchConfig(peers=("llama-cpp:q2",), backends=(), passes_off=False, contiguous=False)
    with pytest.raises(ValueError, match="unknown variant 'q2'"):
        bench.build_systems(model, bad)


def test_stored_weight_bytes_of_quantized_weights():
    model = models.build("llama")
    fp32 = bench.stored_weight_bytes(model)
    linears = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    tied = model.get_input_embeddings().weight.data_ptr()
    untied = sum(w.numel() for w in linears if w.data_ptr() != tied)
    every = sum(w.numel() for w in linears)
    # int8, groups of 32: 1 byte per weight + a 4-byte scale per 32 weights (a tied lm_head adds its own copy)
    assert bench.stored_weight_bytes(model, "int8") == fp32 - 4 * untied + every + every // 32 * 4
    # int4: half a byte per weight, but the lm_head and the layers with fewer outputs than inputs
    # (down_proj, and k/v of this grouped-query model) keep 8 bits (QuantConfig.lm_head_bits, narrowing_bits)
    head = model.get_output_embeddings().weight.numel()
    narrowing = sum(w.numel() for w in linears if w.shape[0] < w.shape[1])
    assert 0 < narrowing < every - head
    eight = head + narrowing
    assert bench.stored_weight_bytes(model, "int4") == fp32 - 4 * untied + (every - eight) // 2 + eight + every // 32 * 4
