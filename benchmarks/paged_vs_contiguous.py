"""Decode step time of the paged KV cache against the contiguous one, on one model, interleaved.

Both variants are optimized in this process on the same backend (through the compile cache,
so a rerun on a quiet machine skips the compile unless ``--no-cache``), then
measured in alternating rounds: greedy generation of ``--new-tokens`` from the same prompt,
batch 1, TPOT = median gap between streamed tokens, the table gives the median over rounds.
Tokens of the two must be identical.

    .venv/bin/python benchmarks/paged_vs_contiguous.py --model smollm2 --json smollm2-paged.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import pdcompile
from pdcompile import bench, models
from pdcompile.config import CacheConfig, OptimizeConfig
from pdcompile.timing import TimingStreamer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2", choices=["smollm2", "r1"])
    ap.add_argument("--backend", default="onnxruntime")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--json")
    ap.add_argument("--no-cache", action="store_true", help="compile from scratch (optimize times are then cold)")
    ap.add_argument("--decomposed", action="store_true",
                    help="onnxruntime: also measure the paged graph with its attention decomposed "
                         "(OrtOptions(group_query_attention=False)) beside the native one")
    args = ap.parse_args()

    model = models.load_smollm2()[0] if args.model == "smollm2" else models.r1_model()
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (1, args.prompt_len), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    systems = {}
    variants = [("paged", True, None), ("contiguous", False, None)]
    if args.decomposed:
        from pdcompile.backends.onnxruntime import OrtOptions

        variants.append(("paged-decomposed", True, OrtOptions(group_query_attention=False)))
    for name, paged, options in variants:
        t0 = time.perf_counter()
        config = OptimizeConfig(backend=args.backend, backend_options=options,
                                cache=CacheConfig(max_batch_size=1, max_seq_len=1024, paged=paged, prefix_cache=False))
        systems[name] = pdcompile.optimize(model, config=config, cache=not args.no_cache)
        print(f"{name}: optimized in {time.perf_counter() - t0:.1f} s", flush=True)
    tpot = {n: [] for n in systems}
    outs = {}
    for r in range(args.rounds + 1):  # round 0 warms up
        for name, fast in systems.items():
            streamer = TimingStreamer()
            out = fast.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.new_tokens,
                                min_new_tokens=args.new_tokens, do_sample=False, streamer=streamer)
            outs[name] = out
            gaps = [b - a for a, b in zip(streamer.token_times, streamer.token_times[1:])]
            if r:
                tpot[name].append(statistics.median(gaps) * 1e3)
        print(f"round {r}: " + ", ".join(f"{n} {v[-1]:.2f} ms" for n, v in tpot.items() if v), flush=True)
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "machine": bench.machine_info(), "model": args.model,
        "backend": args.backend, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "rounds": args.rounds,
        "tpot_ms_median": {n: statistics.median(v) for n, v in tpot.items()},
        "tpot_ms_rounds": tpot,
        "tokens_identical": bool(torch.equal(outs["paged"], outs["contiguous"])),
        "bandwidth_gbs": bench.measure_bandwidth() / 1e9,
    }
    result["paged_over_contiguous"] = result["tpot_ms_median"]["paged"] / result["tpot_ms_median"]["contiguous"]
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
