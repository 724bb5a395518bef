"""Could one graph serve prefill and prefix-cache continuation? TTFT of the prefill graph
against the extend graph run from position 0 (no cached tokens), same prompt, same pool.

The extend graph attends through the block table over the whole reservation (prompt +
max_new_tokens) with an explicit mask; the prefill graph runs the fused causal attention
over the prompt only and prunes the last layer to the last position. If extend-from-0 cost
about the same, optimize() could build two graphs instead of three (issue 14, part 3).

    python benchmarks/extend_as_prefill.py --model r1 --prompts 32 128 512 --rounds 9

Prints per prompt length the median prefill and extend-from-0 times (interleaved rounds)
and their ratio, checks that both give the same logits, and writes --json. About 3 minutes
for r1 on 2 cores (most of it optimize()), 6-8 for smollm2.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import pdcompile
from pdcompile.cli import load_model
from pdcompile.phase import Role


def run_phase(fast, ids, new_tokens: int, as_extend: bool):
    """One prefill of ``ids`` [1, S] through the prefill graph, or the extend graph from 0."""
    runner = fast.runner
    lengths = torch.tensor([ids.shape[1]])
    seqs = runner.kv.start(ids, lengths, new_tokens)
    try:
        _, inputs = runner.kv.prefill_inputs(seqs, "prefill")
        phase = "prefill"
        if as_extend:
            inputs[Role.POSITIONS] = torch.zeros(1, dtype=torch.long)
            phase = "extend"
        t0 = time.perf_counter()
        logits = runner.executor.run(phase, inputs)
        return time.perf_counter() - t0, logits.clone()
    finally:
        runner.kv.finish(seqs)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="r1", help="r1, smollm2 or a model folder")
    ap.add_argument("--backend", default="onnxruntime")
    ap.add_argument("--prompts", nargs="*", type=int, default=[32, 128, 512])
    ap.add_argument("--new-tokens", type=int, default=64, help="the reservation a generate() call would make")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    model, _ = load_model(args.model)
    max_seq = max(args.prompts) + args.new_tokens + 16
    t0 = time.perf_counter()
    fast = pdcompile.optimize(model, backend=args.backend, max_batch_size=1, max_seq_len=max_seq)
    print(f"optimize: {time.perf_counter() - t0:.1f} s ({fast.pdcompile_report().timings})")
    vocab = model.get_input_embeddings().weight.shape[0]
    rows = []
    for length in args.prompts:
        ids = torch.randint(3, vocab, (1, length), generator=torch.Generator().manual_seed(length))
        times = {"prefill": [], "extend": []}
        for _ in range(2):  # warm-up both
            run_phase(fast, ids, args.new_tokens, False), run_phase(fast, ids, args.new_tokens, True)
        for _ in range(args.rounds):
            tp, lp = run_phase(fast, ids, args.new_tokens, False)
            te, le = run_phase(fast, ids, args.new_tokens, True)
            times["prefill"].append(tp)
            times["extend"].append(te)
        diff = float((lp - le).abs().max())
        p, e = statistics.median(times["prefill"]) * 1e3, statistics.median(times["extend"]) * 1e3
        rows.append({"prompt": length, "prefill_ms": p, "extend_from_0_ms": e, "ratio": e / p,
                     "max_abs_logit_diff": diff, "same_argmax": bool(lp.argmax(-1).eq(le.argmax(-1)).all())})
        print(f"prompt {length:5d}: prefill {p:8.1f} ms, extend from 0 {e:8.1f} ms, x{e / p:.2f}, "
              f"max |logit diff| {diff:.2e}")
    out = {"model": args.model, "backend": args.backend, "threads": torch.get_num_threads(),
           "new_tokens": args.new_tokens, "rounds": args.rounds, "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
