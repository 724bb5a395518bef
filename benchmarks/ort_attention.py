"""Decode step time with ONNX Runtime's GroupQueryAttention against the decomposed attention, interleaved.

Three onnxruntime variants of one model are optimized in this process (compile cache off):
contiguous KV with GroupQueryAttention (the default for contiguous caches), contiguous KV with
the decomposed matmul/softmax attention (``OrtOptions(group_query_attention=False)``, what the
backend emitted before), and the default paged KV (which keeps the decomposed attention).
They are measured in alternating rounds: greedy generation of ``--new-tokens`` from the same
prompt, batch 1 (no logits processor), TPOT = median gap between streamed tokens; the table gives the median over
rounds. Tokens must be identical. The decode graph's node count by op type (the lowered ONNX
graph, before ONNX Runtime's own fusions) is recorded for each.

    .venv/bin/python benchmarks/ort_attention.py --model smollm2 --json ort-attention.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

import pdcompile
from pdcompile import bench, models
from pdcompile.backends.onnxruntime import OrtOptions
from pdcompile.config import CacheConfig, OptimizeConfig
from pdcompile.timing import TimingStreamer

VARIANTS = {  # name -> (paged, group_query_attention)
    "contiguous+gqa": (False, True),
    "contiguous+decomposed": (False, False),
    "paged (decomposed)": (True, True),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2", choices=["smollm2", "r1"])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--max-seq-len", type=int, default=1024)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--json")
    args = ap.parse_args()

    load_before = os.getloadavg()
    model = models.load_smollm2()[0] if args.model == "smollm2" else models.r1_model()
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (1, args.prompt_len), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    systems, nodes = {}, {}
    for name in args.variants.split(","):
        paged, gqa = VARIANTS[name]
        config = OptimizeConfig(backend="onnxruntime",
                                cache=CacheConfig(max_batch_size=1, max_seq_len=args.max_seq_len, paged=paged, prefix_cache=False),
                                backend_options=OrtOptions(group_query_attention=gqa))
        t0 = time.perf_counter()
        systems[name] = pdcompile.optimize(model, config=config, cache=False)
        ops = systems[name].runner.executor.phases["decode"][0].op_types
        nodes[name] = {"total": sum(ops.values()), **dict(ops.most_common())}
        print(f"{name}: optimized in {time.perf_counter() - t0:.1f} s; decode graph {nodes[name]['total']} nodes, "
              f"{ops['GroupQueryAttention']} GroupQueryAttention", flush=True)
    tpot = {n: [] for n in systems}
    outs = {}
    for r in range(args.rounds + 1):  # round 0 warms up
        for name, fast in systems.items():
            streamer = TimingStreamer()
            # no min_new_tokens: its logits processor costs more per step than attention does (issue 15)
            out = fast.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.new_tokens,
                                do_sample=False, streamer=streamer)
            outs[name] = out
            gaps = [b - a for a, b in zip(streamer.token_times, streamer.token_times[1:])]
            if r:
                tpot[name].append(statistics.median(gaps) * 1e3)
        print(f"round {r}: " + ", ".join(f"{n} {v[-1]:.2f} ms" for n, v in tpot.items() if v), flush=True)
    first = next(iter(outs.values()))
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "machine": bench.machine_info(), "model": args.model,
        "backend": "onnxruntime", "prompt_len": args.prompt_len, "max_seq_len": args.max_seq_len, "new_tokens": args.new_tokens, "rounds": args.rounds,
        "tpot_ms_median": {n: statistics.median(v) for n, v in tpot.items()},
        "tpot_ms_rounds": tpot,
        "decode_graph_nodes": nodes,
        "tokens_identical": all(torch.equal(first, o) for o in outs.values()),
        "new_tokens_generated": first.shape[1] - args.prompt_len,
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
    }
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
