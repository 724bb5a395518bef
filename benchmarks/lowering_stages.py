"""Where a cold onnxruntime optimize() spends its time, stage by stage inside the lowering.

    python benchmarks/lowering_stages.py [--model smollm2] [--json out.json]

One process, compile cache off, ``optimize(model, prefix_cache=False)`` (prefill + decode):
optimize()'s own stage times, and inside each phase's lowering the seconds of the re-export
(``export_program``), the ONNX translation (``to_onnx``: torch.onnx's translator, with or
without its decomposition retrace), onnxscript's ORT optimization (``_optimize_for_ort``) and
the session build (``_session``), timed by wrapping those functions. About 2 minutes for
SmolLM2 on 2 cores.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time

os.environ.setdefault("PDCOMPILE_CACHE", "0")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import pdcompile
    from pdcompile.backends import onnxruntime as ort_backend
    from pdcompile.cli import load_model

    stages: dict[str, list[float]] = {}

    def timed(name):
        fn = getattr(ort_backend, name)

        @functools.wraps(fn)
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                stages.setdefault(name, []).append(round(time.perf_counter() - t, 2))

        setattr(ort_backend, name, wrapper)

    for name in ("export_program", "to_onnx", "_optimize_for_ort", "_session"):
        timed(name)
    model, _ = load_model(args.model)
    t = time.perf_counter()
    fast = pdcompile.optimize(model, backend="onnxruntime", prefix_cache=False)
    total = time.perf_counter() - t
    result = {"model": args.model, "total_s": round(total, 2),
              "optimize_stages": {k: round(v, 2) for k, v in fast.pdcompile_report().timings.items()},
              "lowering_stages_per_phase": stages, "phases": ["prefill", "decode"]}
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
