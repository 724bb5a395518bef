"""ONNX Runtime's ``MatMulNBits`` on this CPU: time per call by bits and ``accuracy_level``.

One node per session (``com.microsoft::MatMulNBits``, random codes and scales in the layout
pdcompile's quantize_weights pass writes), SmolLM2's MLP up-projection shape by default
(K=576 -> N=1536, group 32), for one row (a decode step) and 128 rows (a prompt). The
variants run interleaved: each round times every variant once (``--calls`` calls each);
the table gives the median over rounds, in microseconds per call.

    .venv/bin/python benchmarks/matmul_nbits.py --json matmul-nbits.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from pdcompile import bench


def session(k: int, n: int, group: int, bits: int, level: int, threads: int) -> ort.InferenceSession:
    groups = k // group
    rng = np.random.default_rng(0)
    codes = numpy_helper.from_array(rng.integers(0, 256, (n, groups, group * bits // 8), dtype=np.uint8), "codes")
    scales = numpy_helper.from_array((rng.random(n * groups) * 0.01).astype(np.float32), "scales")
    node = helper.make_node("MatMulNBits", ["x", "codes", "scales"], ["y"], domain="com.microsoft",
                            K=k, N=n, bits=bits, block_size=group, accuracy_level=level)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [codes, scales])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--k", type=int, default=576)
    ap.add_argument("--n", type=int, default=1536)
    ap.add_argument("--group", type=int, default=32)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 128])
    ap.add_argument("--levels", type=int, nargs="+", default=[0, 4])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--json")
    args = ap.parse_args()

    variants = {}
    for rows in args.rows:
        for bits in (8, 4):
            for level in args.levels:
                s = session(args.k, args.n, args.group, bits, level, args.threads)
                x = np.random.default_rng(1).random((rows, args.k), dtype=np.float32)
                s.run(None, {"x": x})  # first-call costs (pre-packing)
                variants[(rows, bits, level)] = (s, x)
    times = {v: [] for v in variants}
    for _ in range(args.rounds):
        for v, (s, x) in variants.items():
            t = time.perf_counter()
            for _ in range(args.calls):
                s.run(None, {"x": x})
            times[v].append((time.perf_counter() - t) / args.calls * 1e6)
    rows = [dict(rows=r, bits=b, accuracy_level=lv, us_median=statistics.median(t), us_rounds=t)
            for (r, b, lv), t in times.items()]
    print(f"MatMulNBits K={args.k} N={args.n} group {args.group}, {args.threads} threads, onnxruntime "
          f"{ort.__version__}; median of {args.rounds} interleaved rounds of {args.calls} calls")
    print("| rows | bits | accuracy_level | us per call |\n| --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['rows']} | {r['bits']} | {r['accuracy_level']} | {r['us_median']:.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"date": time.strftime("%Y-%m-%d %H:%M"), "machine": bench.machine_info(), "args": vars(args),
                       "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
