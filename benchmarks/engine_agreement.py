"""Greedy agreement of the engine (continuous batching) with ``generate()`` on each prompt alone.

On SmolLM2 (the default backend, paged cache, prefix cache on), ``--requests`` prompts cut
from the Alice text shipped in ``benchmarks/data`` (lengths lognormal, median 96 tokens,
clipped to [8, 400]; every other prompt starts with one shared 48-token "system prompt",
so the prefix cache and the extend graph serve part of them) run twice:

* alone: ``fast.generate(prompt, max_new_tokens=N, do_sample=False)`` one at a time, with
  the scores of every step (``output_scores``);
* together: all submitted to one :class:`pdcompile.Engine` at once, so they run in batches
  that change every step (decodes beside chunked prefills, 64-token chunks), greedy.

Both stop at end-of-sequence the same way. A request agrees when its tokens are identical.
For every one that does not, the script reports the first step that differs and, from the
alone run's scores at that step, the gap between the top logit and the logit of the token
the engine chose: a gap at fp32 rounding level (< 1e-3 of the logit's magnitude) means a
near-tie that a different batch shape (another GEMM blocking, another reduction order)
legitimately breaks the other way. Any larger gap is reported as a real divergence.

    .venv/bin/python benchmarks/engine_agreement.py --requests 200 --json engine-agreement.json
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import numpy as np
import torch

import pdcompile
from pdcompile import bench, models

TIE = 1e-3  # relative logit gap below which a differing greedy choice is a near-tie


def prompts_from_text(tokenizer, n: int, seed: int) -> list[list[int]]:
    text = (pathlib.Path(__file__).parent / "data" / "alice-ch1-2.txt").read_text()
    ids = tokenizer(text)["input_ids"]
    rng = np.random.default_rng(seed)
    system = ids[:48]
    out = []
    for i in range(n):
        length = int(np.clip(rng.lognormal(np.log(96), 0.6), 8, 400))
        start = int(rng.integers(48, len(ids) - length))
        body = ids[start:start + length]
        out.append((system + body) if i % 2 else body)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--backend", default="onnxruntime")
    ap.add_argument("--max-num-seqs", type=int, default=8)
    ap.add_argument("--chunk", type=int, default=64, help="the engine's prefill token budget per step")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json")
    args = ap.parse_args()

    model, tokenizer = models.load_smollm2()
    t0 = time.perf_counter()
    fast = pdcompile.optimize(model, backend=args.backend, max_batch_size=args.max_num_seqs, max_seq_len=512)
    print(f"optimized in {time.perf_counter() - t0:.1f} s", flush=True)
    prompts = prompts_from_text(tokenizer, args.requests, args.seed)

    alone, scores = [], []
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        out = fast.generate(input_ids=torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                            max_new_tokens=args.new_tokens, do_sample=False, output_scores=True,
                            return_dict_in_generate=True)
        alone.append(out.sequences[0, len(p):].tolist())
        scores.append([s[0] for s in out.scores])
        if i % 20 == 19:
            print(f"alone: {i + 1}/{len(prompts)}", flush=True)
    alone_s = time.perf_counter() - t0

    engine = pdcompile.Engine(fast, max_num_seqs=args.max_num_seqs, max_prefill_tokens=args.chunk)
    engine.prepare()
    t0 = time.perf_counter()
    done = engine.generate(prompts, pdcompile.SamplingParams(max_tokens=args.new_tokens))
    engine_s = time.perf_counter() - t0
    stats = engine.stats()

    rows = []
    for i, (ref, c) in enumerate(zip(alone, done)):
        got = c.token_ids
        # generate() keeps the eos it stopped at; the engine returns it too
        if got == ref:
            continue
        step = next((k for k, (a, b) in enumerate(zip(ref, got)) if a != b), min(len(ref), len(got)))
        row = {"request": i, "prompt_len": len(prompts[i]), "first_diff_step": step,
               "alone": ref[step:step + 4], "engine": got[step:step + 4]}
        if step < len(ref) and step < len(got):
            s = scores[i][step].float()
            top, chosen = s[ref[step]].item(), s[got[step]].item()
            row.update(top_logit=top, engine_token_logit=chosen, gap=top - chosen,
                       rel_gap=(top - chosen) / max(abs(top), 1e-6))
            row["near_tie"] = row["rel_gap"] < TIE
        else:
            row["near_tie"] = False  # one stopped, the other did not: a length difference
        rows.append(row)

    agree = args.requests - len(rows)
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "machine": bench.machine_info(),
        "versions": {"pdcompile": pdcompile.__version__, "torch": torch.__version__},
        "backend": args.backend, "requests": args.requests, "new_tokens": args.new_tokens,
        "max_num_seqs": args.max_num_seqs, "chunk": args.chunk, "seed": args.seed,
        "prompt_lengths": {"min": min(map(len, prompts)), "median": int(np.median([len(p) for p in prompts])),
                           "max": max(map(len, prompts))},
        "identical": agree, "agreement": agree / args.requests, "divergences": rows,
        "near_ties": sum(r["near_tie"] for r in rows), "alone_s": alone_s, "engine_s": engine_s,
        "engine_stats": stats,
    }
    print(f"identical: {agree}/{args.requests} ({100 * agree / args.requests:.1f}%); "
          f"divergences: {len(rows)} ({result['near_ties']} near-ties); alone {alone_s:.0f} s, engine {engine_s:.0f} s")
    for r in rows:
        print(r)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
