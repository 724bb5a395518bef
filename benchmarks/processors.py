"""Decode step time with and without logits processors, one process, interleaved.

    python benchmarks/processors.py [--model r1|smollm2] [--backend onnxruntime] [--rounds 8] [--new 64]

Optimizes the model once, then runs generate() with each variant in turn, ``--rounds``
times, and prints per variant the median over rounds of (a) the median decode step
(GenerationTimings.tpot_s) and (b) the process CPU time per new token (all threads;
spinning threads show up here even when the machine is busy). Variants: no
processor, min_new_tokens=N, repetition_penalty=1.1, no_repeat_ngram_size=3,
bad_words_ids. ``--before`` also runs every variant with the per-step logits work on
torch's full thread pool (pdcompile.generation._one_thread disabled), which is how
pdcompile ran processors before it: before and after come from the same run.

The random-weight R1 rarely emits EOS; every variant must make ``--new`` tokens (checked;
SmolLM2 is given min_new_tokens-free variants only if it makes them too).
R1 has a 32000-token vocabulary, below the 32768-element size where torch ops go
parallel, so the effect shows on SmolLM2 (49152) and larger vocabularies.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

# run from a checkout: this tree's pdcompile, not whichever one is installed
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="r1", help="r1 (random reference Llama) or smollm2")
    p.add_argument("--backend", default="onnxruntime")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--before", action="store_true", help="also run each variant with processors on all threads")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    import pdcompile
    import pdcompile.generation as generation
    from pdcompile import models

    model = models.r1_model() if args.model == "r1" else models.load_smollm2()[0]
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab - 1, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    opt = pdcompile.optimize(model, backend=args.backend, max_batch_size=1, max_seq_len=args.prompt + args.new + 8)
    print(f"optimize({args.backend}): {time.perf_counter() - t0:.1f} s")
    variants = {
        "none": {},
        f"min_new_tokens={args.new}": {"min_new_tokens": args.new},
        "repetition_penalty=1.1": {"repetition_penalty": 1.1},
        "no_repeat_ngram_size=3": {"no_repeat_ngram_size": 3},
        "bad_words_ids": {"bad_words_ids": [[5], [7, 8]]},
    }
    one_thread = generation._one_thread
    modes = {"after": one_thread} | ({"before": contextlib.nullcontext} if args.before else {})

    def run(kw, mode):
        generation._one_thread = modes[mode]
        try:
            c = time.process_time()
            out = opt.generate(ids, max_new_tokens=args.new, min_new_tokens=kw.get("min_new_tokens"), do_sample=False,
                               **{k: v for k, v in kw.items() if k != "min_new_tokens"})
            cpu = (time.process_time() - c) * 1e3 / args.new
        finally:
            generation._one_thread = one_thread
        if out.shape[1] != args.prompt + args.new:
            raise SystemExit(f"{kw}: stopped at EOS after {out.shape[1] - args.prompt} tokens; use --model r1")
        return opt.last_timings.tpot_s * 1e3, cpu

    for v in variants.values():  # warm-up
        for m in modes:
            run(v, m)
    samples = {(m, v): [] for m in modes for v in variants}
    for _ in range(args.rounds):
        for v, kw in variants.items():
            for m in modes:
                samples[(m, v)].append(run(kw, m))
    print(f"{args.model} on {args.backend}: decode step ms (median of {args.rounds} interleaved rounds) and CPU ms "
          f"per token, {args.threads} threads, prompt {args.prompt}, {args.new} new tokens")
    for m in modes:
        base = statistics.median(s[0] for s in samples[(m, "none")])
        for v in variants:
            tpot = statistics.median(s[0] for s in samples[(m, v)])
            cpu = statistics.median(s[1] for s in samples[(m, v)])
            print(f"  {m:6s} {v:24s} step {tpot:7.2f} ms ({tpot - base:+6.2f})   cpu {cpu:7.2f} ms/token")


if __name__ == "__main__":
    main()
