"""Two checkouts of pdcompile side by side: cold optimize() time, TTFT and TPOT, interleaved.

    python benchmarks/ab_checkouts.py --base 1f2f8fc --models r1 smollm2 --rounds 3 --json out.json

The base is checked out as a git worktree in a temporary folder and imported ahead of the
installed package (``PYTHONPATH``); "new" is this working tree. Each round runs one fresh
process per checkout and model, alternating which goes first: optimize() over an empty
compile cache (cold, the default configuration), then TTFT = median of ``--ttft-runs``
one-token generations of new random 128-token prompts (no prefix-cache hit; the same ids for
both checkouts), TPOT = median step of a 64-token greedy generation (``min_new_tokens=64``). The two checkouts' greedy tokens must be identical. The table
gives medians over rounds. Run it on a quiet machine: nothing else may share the cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, os, statistics, sys, time
import torch, pdcompile
from pdcompile.cli import load_model
from pdcompile.timing import TimingStreamer
assert os.path.realpath(pdcompile.__file__).startswith(os.path.realpath(sys.argv[2])), pdcompile.__file__
model, _ = load_model(sys.argv[1])
t = time.perf_counter()
fast = pdcompile.optimize(model)  # the default configuration (prefill, decode, extend graphs)
cold = time.perf_counter() - t
g = torch.Generator().manual_seed(0)
prompt = lambda: torch.randint(3, min(model.config.vocab_size, 32000), (1, 128), generator=g)
ids = prompt()
mask = torch.ones_like(ids)
fast.generate(input_ids=prompt(), attention_mask=mask, max_new_tokens=2, do_sample=False)  # warm-up
ttft = []
for _ in range(int(sys.argv[3])):  # a new prompt each time: no prefix-cache hit
    p = prompt()
    t = time.perf_counter()
    fast.generate(input_ids=p, attention_mask=mask, max_new_tokens=1, do_sample=False)
    ttft.append((time.perf_counter() - t) * 1e3)
streamer = TimingStreamer()
out = fast.generate(input_ids=ids, attention_mask=mask, max_new_tokens=64, min_new_tokens=64, do_sample=False,
                    streamer=streamer)
print(json.dumps({"cold_s": cold, "stages": fast.pdcompile_report().timings, "ttft_ms": statistics.median(ttft),
                  "tpot_ms": streamer.tpot_s * 1e3, "tokens": out[0, 128:].tolist()}))
"""


def run_child(src: Path, model: str, ttft_runs: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="pdc-ab-") as tmp:  # empty caches, removed after (1-2 GB each)
        env = {**os.environ, "PYTHONPATH": str(src), "PDCOMPILE_CACHE_DIR": f"{tmp}/cache",
               "TORCHINDUCTOR_CACHE_DIR": f"{tmp}/inductor"}
        proc = subprocess.run([sys.executable, "-c", CHILD, model, str(src / "pdcompile"), str(ttft_runs)],
                              capture_output=True, text=True, env=env, cwd=src)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True, help="git ref of the base checkout")
    ap.add_argument("--models", nargs="*", default=["r1", "smollm2"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ttft-runs", type=int, default=15)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pdc-ab-"))
    base = work / "base"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(base), args.base], check=True,
                   capture_output=True)
    sources = {"base": base, "new": ROOT}
    results: dict = {"base_ref": args.base, "models": {}}
    try:
        for model in args.models:
            runs = {"base": [], "new": []}
            for r in range(args.rounds):
                for name in (("base", "new") if r % 2 == 0 else ("new", "base")):
                    row = run_child(sources[name], model, args.ttft_runs)
                    runs[name].append(row)
                    print(f"{model} round {r} {name}: cold {row['cold_s']:.1f} s, TTFT {row['ttft_ms']:.1f} ms, "
                          f"TPOT {row['tpot_ms']:.2f} ms", flush=True)
            same = all(a["tokens"] == b["tokens"] for a, b in zip(runs["base"], runs["new"]))
            summary = {name: {k: statistics.median(x[k] for x in rows) for k in ("cold_s", "ttft_ms", "tpot_ms")}
                       for name, rows in runs.items()}
            results["models"][model] = {"runs": runs, "median": summary, "tokens_identical": same}
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    print("\n| model | checkout | cold optimize() s | TTFT ms | TPOT ms/token |\n| --- | --- | --- | --- | --- |")
    for model, res in results["models"].items():
        for name, m in res["median"].items():
            print(f"| {model} | {name} | {m['cold_s']:.1f} | {m['ttft_ms']:.1f} | {m['tpot_ms']:.2f} |")
        print(f"tokens identical ({model}): {res['tokens_identical']}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
