"""optimize() time and peak memory on real model sizes (random weights), one run per process.

    python -m pdcompile.size_bench qwen2.5-0.5b onnxruntime [--dtype bfloat16] [--json out.json]
    python -m pdcompile.size_bench all --json benchmarks/model-size-DATE.json   # every case below


Builds the model (:func:`pdcompile.models.random_model`), runs HF eager greedy decoding as
the reference, then measures ``pdcompile.optimize()`` alone: wall time, and the growth of
the process's peak RSS over its RSS just before the call (the kernel's peak counter is
reset there, /proc/self/clear_refs), against the weight bytes. Then generates the same
greedy tokens (recording the peak RSS growth of that first generate too) and compares them
with the reference. One process per run, so that no run
inherits another's memory; the slow tests and BENCHMARKS.md ("Model size") use it.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import shutil
import sys
import tempfile
import time

import torch

PROMPT = 16
NEW_TOKENS = 8
# Logit tolerance, relative to the largest |logit| of the step. fp32: kernels differ in
# summation order only. bf16: HF rounds every op to 8 significant bits while a backend may
# keep fp32 in between (inductor's fused kernels; onnxruntime computes in fp32 throughout);
# measured on the 0.5B, bf16 and fp32 runs of the same weights differ by ~1.5% of the
# largest logit, so 4%.
REL_TOL = {"float32": 1e-3, "bfloat16": 0.04, "float16": 0.02}


def compare(ref, out, rel_tol: float) -> dict:
    """Greedy runs ``ref`` (HF) and ``out`` step by step.

    Tokens must be equal and logits within ``rel_tol`` until the end, or until a step where
    the reference's top-2 logits are closer than the tolerance (a near-tie that precision
    alone may decide): there the tokens may part, and nothing after is compared.
    """
    steps, diff = 0, 0.0
    for a, b, ta, tb in zip(ref.logits, out.logits, ref.sequences[0, PROMPT:], out.sequences[0, PROMPT:]):
        a, b = a[0].float(), b[0].float()
        tol = rel_tol * float(a.abs().max())
        diff = max(diff, float((a - b).abs().max()) / float(a.abs().max()))
        top = a.topk(2).values
        near_tie = float(top[0] - top[1]) <= tol
        if float((a - b).abs().max()) > tol or (ta != tb and not near_tie):
            return {"agree": False, "steps_compared": steps, "max_rel_logit_diff": diff}
        if ta != tb:
            break
        steps += 1
    return {"agree": True, "steps_compared": steps, "max_rel_logit_diff": diff}


def run(size: str, backend: str, dtype: torch.dtype = torch.float32, max_seq_len: int = 1024,
        max_batch_size: int = 1) -> dict:
    import pdcompile
    from pdcompile import memory
    from pdcompile.models import random_model

    t0 = time.perf_counter()
    model = random_model(size, dtype)
    build_s = time.perf_counter() - t0
    weights = memory.weight_bytes(model)
    ids = torch.randint(0, model.config.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(1))
    kw = dict(max_new_tokens=NEW_TOKENS, do_sample=False, return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        ref = model.generate(ids, **kw)
    gc.collect()
    memory.reset_peak_rss()
    before = memory.rss_bytes()
    t0 = time.perf_counter()
    fast = pdcompile.optimize(model, backend=backend, max_seq_len=max_seq_len, max_batch_size=max_batch_size)
    optimize_s = time.perf_counter() - t0
    peak = memory.peak_rss_bytes()
    memory.reset_peak_rss()
    after = memory.rss_bytes()
    with torch.no_grad():
        t0 = time.perf_counter()
        out = fast.generate(ids, **kw)
        generate_s = time.perf_counter() - t0
    generate_growth = memory.peak_rss_bytes() - after
    # rough speed, one run each (the prompt is one token short of a full block: no prefix-cache hit)
    with torch.no_grad():
        t0 = time.perf_counter()
        fast.generate(ids, max_new_tokens=1, do_sample=False)
        t1 = time.perf_counter()
        fast.generate(ids, max_new_tokens=9, do_sample=False)
        t2 = time.perf_counter()
    ttft, tpot = t1 - t0, (t2 - t1 - (t1 - t0)) / 8
    agreement = compare(ref, out, REL_TOL[str(dtype).replace("torch.", "")])
    return {
        "size": size, "backend": backend, "dtype": str(dtype).replace("torch.", ""),
        "params": sum(p.numel() for p in model.parameters()), "weight_bytes": weights,
        "build_s": round(build_s, 1), "optimize_s": round(optimize_s, 1),
        "rss_before": before, "peak_rss": peak, "peak_growth": peak - before,
        "growth_x_weights": round((peak - before) / weights, 3),
        "kv_pool_bytes": fast.runner.kv_stats().get("bytes", 0) if hasattr(fast, "runner") else None,
        "generate_s": round(generate_s, 1), "generate_peak_growth": generate_growth,
        "ttft_ms": round(ttft * 1e3, 1), "tpot_ms": round(tpot * 1e3, 1),
        "tokens": out.sequences[0, PROMPT:].tolist(), "reference": ref.sequences[0, PROMPT:].tolist(),
        "tokens_match": torch.equal(out.sequences, ref.sequences),
        **agreement,
    }


# What BENCHMARKS.md "Model size" reports: fp32 up to 1.5B, 3B in bf16 (its fp32 weights,
# 12.4 GB, leave a 24 GB machine too little for HF's reference run next to optimize()).
CASES = [(size, backend, dtype) for size, dtype in (("qwen2.5-0.5b", "float32"), ("qwen2.5-1.5b", "float32"),
                                                    ("qwen2.5-3b", "bfloat16"))
         for backend in ("eager", "inductor", "onnxruntime")]


def run_all(json_path: str | None) -> list[dict]:
    """Every case in :data:`CASES`, one subprocess each, one at a time; prints the table."""
    import subprocess

    results = []
    for size, backend, dtype in CASES:
        proc = subprocess.run([sys.executable, "-m", "pdcompile.size_bench", size, backend, "--dtype", dtype],
                              capture_output=True, text=True)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:  # refused (InsufficientMemoryError) or failed: recorded with its last words
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            results.append({"size": size, "backend": backend, "dtype": dtype, "error": tail[:500]})
        else:
            results.append(json.loads(line[7:]))
        print(json.dumps(results[-1]), flush=True)
    print(table(results))
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"machine": machine(), "results": results}, f, indent=1)
    return results


def machine() -> dict:
    import platform

    import onnxruntime
    import transformers

    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((x.split(":", 1)[1] for x in f if x.startswith("flags")), "")
    except OSError:
        pass
    wanted = [f for f in flags.split() if f.startswith(("avx", "fma", "amx"))]
    return {"cpus": os.cpu_count(), "cpu_flags": wanted, "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "onnxruntime": onnxruntime.__version__}


def table(results: list[dict]) -> str:
    """The markdown table of BENCHMARKS.md "Model size"; "tokens match" compares each run
    with HF eager and with the other backends of the same size and dtype."""
    rows = ["| size | params | dtype | backend | weights GB | optimize s (contended) | peak RSS growth GB | "
            "growth / weights | tokens = HF | same tokens on every backend |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        if "error" in r:
            rows.append(f"| {r['size']} | | {r['dtype']} | {r['backend']} | | refused or failed: {r['error']} | | | | |")
            continue
        peers = [x["tokens"] for x in results if "tokens" in x and x["size"] == r["size"] and x["dtype"] == r["dtype"]]
        same = "yes" if all(t == peers[0] for t in peers) else "no"
        hf = "yes" if r["tokens_match"] else ("within tolerance" if r["agree"] else "no")
        rows.append(f"| {r['size']} | {r['params'] / 1e9:.2f}B | {r['dtype']} | {r['backend']} | "
                    f"{r['weight_bytes'] / 1e9:.2f} | {r['optimize_s']} | {r['peak_growth'] / 1e9:.2f} | "
                    f"{r['growth_x_weights']:.2f}x | {hf} | {same} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("size", help="a pdcompile.models.SIZES name, or 'all' (every case in CASES)")
    parser.add_argument("backend", nargs="?", default="onnxruntime")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--max-seq-len", type=int, default=1024)
    parser.add_argument("--json", help="also write the result to this file")
    parser.add_argument("--warm-inductor-cache", action="store_true",
                        help="use the usual inductor cache instead of a fresh, empty one (cold compile)")
    args = parser.parse_args(argv)
    if args.size == "all":
        run_all(args.json)
        return 0
    cache = None
    if not args.warm_inductor_cache:  # an empty cache: compile times of a first optimize()
        cache = os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="pdcompile-size-bench-")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for name in ("torch", "onnxscript", "onnx_ir"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        result = run(args.size, args.backend, getattr(torch, args.dtype), args.max_seq_len)
    finally:
        if cache:
            shutil.rmtree(cache, ignore_errors=True)
    line = json.dumps(result)
    print("RESULT " + line, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
