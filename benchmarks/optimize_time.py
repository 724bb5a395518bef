"""optimize() time cold, cached (a new process, served by the compile cache) and warm (again in
that process), with each stage's time; issue 14's targets are cold <= 30 s (SmolLM2) / <= 10 s
(R1) and cached <= 5 s on 2 cores.

    python benchmarks/optimize_time.py --models r1 smollm2 [--backend onnxruntime] [--whole] [--json out.json]

``--whole`` adds a row per model with every decoder layer captured and lowered
(``OrtOptions(repeat_layers=False)``), run right after the default one.

Each model runs in fresh processes over an empty cache folder (and an empty inductor cache),
so "cold" is cold. Times are optimize() alone (model loading and imports are not counted;
they are printed apart). About 3 minutes for r1 and 6-10 for smollm2 on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import torch, pdcompile
from pdcompile.cli import load_model
model, _ = load_model(sys.argv[1])
setup = time.perf_counter() - t0
runs = []
options = {}
if sys.argv[4] == "whole":
    from pdcompile.backends.onnxruntime import OrtOptions
    options = {"config": pdcompile.OptimizeConfig(backend=sys.argv[2] or "onnxruntime",
                                                  backend_options=OrtOptions(repeat_layers=False))}
for _ in range(int(sys.argv[3])):
    t = time.perf_counter()
    fast = pdcompile.optimize(model, **(options or {"backend": sys.argv[2] or None}))
    runs.append({"s": time.perf_counter() - t, "stages": fast.pdcompile_report().timings})
print(json.dumps({"setup_s": setup, "runs": runs}))
"""


def child(model: str, backend: str, times: int, env: dict, mode: str = "default") -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, model, backend, str(times), mode], capture_output=True,
                          text=True, env=env)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="*", default=["r1", "smollm2"])
    ap.add_argument("--backend", default="", help="default: the device's default backend")
    ap.add_argument("--whole", action="store_true", help="also every layer lowered (no repeated layer)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    results = {}
    for model in args.models:
        for mode in ("default", "whole") if args.whole else ("default",):
            env = {**os.environ, "PDCOMPILE_CACHE": "1", "PDCOMPILE_CACHE_DIR": tempfile.mkdtemp(prefix="pdc-cache-"),
                   "TORCHINDUCTOR_CACHE_DIR": tempfile.mkdtemp(prefix="pdc-inductor-")}
            cold = child(model, args.backend, 1, env, mode)
            cached = child(model, args.backend, 2, env, mode)  # a new process: cached, then warm in that process
            row = {"cold_s": cold["runs"][0]["s"], "cached_s": cached["runs"][0]["s"],
                   "warm_s": cached["runs"][1]["s"], "model_load_s": cold["setup_s"],
                   "cold_stages": cold["runs"][0]["stages"], "cached_stages": cached["runs"][0]["stages"]}
            name = model if mode == "default" else f"{model} (every layer)"
            results[name] = row
            print(f"{name}: cold {row['cold_s']:.1f} s, cached (new process) {row['cached_s']:.2f} s, "
                  f"warm {row['warm_s']:.2f} s  (imports + model load {row['model_load_s']:.1f} s)")
            for label, stages in (("cold", row["cold_stages"]), ("cached", row["cached_stages"])):
                print(f"  {label}: " + ", ".join(f"{k} {v:.2f}" for k, v in stages.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
