"""One paged decode step of a lowered ONNX graph, timed alone: as written before ort_layout's
rewrite, after it, and (``--openvino``) the rewritten graph on OpenVINO's CPU plugin.

    python benchmarks/decode_graph.py --onnx ~/.cache/pdcompile/entries/<key>/decode.onnx \\
        --before --openvino --json benchmarks/smollm2-decode-graph-2026-12-07.json

``--onnx`` is a decode phase as the onnxruntime backend saves it (a bundle's or a compile-cache
entry's ``decode.onnx``, weights in ``decode.onnx.data`` beside it). ``--before``: the graph
was saved before the rewrite existed (an older bundle or cache entry); it is timed beside a
copy rewritten by :func:`pdcompile.backends.ort_layout.drop_unit_layout_moves`. Without it
the graph is timed as it is. Inputs: batch 1, ``--tokens`` cached tokens in 16-token blocks (a
pool just big enough), random K/V; each pool is bound as its own output (written in place,
as OrtPhase binds it). OpenVINO gets the same arrays; its outputs are its own buffers (a
copy of each pool per step, about ``pools x pool bytes``: small at these sizes).
Interleaved rounds of ``--steps`` steps each, median step per round, median over rounds.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def inputs(session_inputs, tokens: int, block: int = 16):
    rng = np.random.default_rng(0)
    blocks = -(-tokens // block)
    table = (1 + np.arange(blocks))[None].astype(np.int64)
    pos = np.array([tokens - 1], np.int64)
    small = {"input_ids": rng.integers(3, 1000, (1, 1)).astype(np.int64), "pos": pos, "block_table": table,
             "slot_mapping": table[0, pos // block] * block + pos % block}
    pools = {}
    for i in session_inputs:
        if i.name.startswith("pool_"):
            shape = [1 + blocks] + [int(d) for d in i.shape[1:]]
            pools[i.name] = rng.standard_normal(shape, dtype=np.float32)
    return small, pools


def ort_step(path: str, small, pools, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.add_session_config_entry("session.force_spinning_stop", "1")  # as OrtPhase
    session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    binding = session.io_binding()
    for name, array in small.items():
        binding.bind_cpu_input(name, array)
    for name, pool in pools.items():
        binding.bind_input(name, "cpu", 0, np.float32, list(pool.shape), pool.ctypes.data)
        binding.bind_output(name.replace("pool_", "present_"), "cpu", 0, np.float32, list(pool.shape),
                            pool.ctypes.data)
    vocab = session.get_outputs()[0].shape[-1]
    logits = np.empty((1, vocab), np.float32)
    binding.bind_output("logits", "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)

    def step():
        session.run_with_iobinding(binding)
        return logits
    step.keep = (session, binding, small, pools, logits)  # the bound memory lives as long as the step
    return step


def openvino_step(path: str, small, pools, threads: int):
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(core.read_model(path), "CPU",
                                  {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32"})
    request = compiled.create_infer_request()
    feeds = {**small, **pools}

    def step():
        request.infer(feeds, share_inputs=True)
        return request.get_tensor("logits").data
    step.keep = (compiled, request, feeds)
    return step


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--onnx", required=True)
    p.add_argument("--before", action="store_true", help="the graph predates the rewrite: time it and a rewritten copy")
    p.add_argument("--openvino", action="store_true")
    p.add_argument("--tokens", type=int, default=192)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json")
    args = p.parse_args(argv)

    import onnx
    import onnx_ir as ir
    import onnxruntime as ort

    from pdcompile.backends.ort_layout import drop_unit_layout_moves

    src = Path(args.onnx).expanduser()
    tmp = Path(tempfile.mkdtemp(prefix="pdcompile-decode-graph-"))
    try:
        graphs = {}
        if args.before:
            # ONNX Runtime reads external data only from the model's own folder: both copies go there
            shutil.copy(src, tmp / "before.onnx")
            if (src.parent / (src.name + ".data")).exists():
                shutil.copy(src.parent / (src.name + ".data"), tmp / (src.name + ".data"))
            model = ir.load(str(tmp / "before.onnx"))
            removed = drop_unit_layout_moves(model)
            onnx.save(ir.serde.serialize_model(model), str(tmp / "after.onnx"))
            print(f"ort_layout removed {removed} nodes")
            graphs["onnxruntime, as lowered before ort_layout"] = str(tmp / "before.onnx")
            graphs["onnxruntime, after ort_layout"] = str(tmp / "after.onnx")
        else:
            graphs["onnxruntime"] = str(src)
        last = list(graphs.values())[-1]
        small, pools0 = inputs(ort.InferenceSession(last, providers=["CPUExecutionProvider"]).get_inputs(),
                               args.tokens)
        steps, results, nodes = {}, {}, {}
        for name, path in graphs.items():
            pools = {k: v.copy() for k, v in pools0.items()}
            steps[name] = ort_step(path, small, pools, args.threads)
            results[name] = steps[name]().copy()
            nodes[name] = len(onnx.load(path, load_external_data=False).graph.node)
        if args.openvino:
            name = "openvino CPU plugin (f32), " + ("after ort_layout" if args.before else "same graph")
            start = time.perf_counter()
            steps[name] = openvino_step(last, small, {k: v.copy() for k, v in pools0.items()}, args.threads)
            print(f"openvino compile {time.perf_counter() - start:.2f} s")
            results[name] = np.array(steps[name]())
            nodes[name] = nodes[list(graphs)[-1]]
        first = next(iter(results.values()))
        agree = {k: dict(max_abs_diff=float(np.abs(v - first).max()), argmax_same=bool((v.argmax(-1) == first.argmax(-1)).all()))
                 for k, v in results.items()}
        rounds = {k: [] for k in steps}
        for _ in range(args.rounds):
            for name, step in steps.items():
                times = []
                for _ in range(args.steps):
                    t = time.perf_counter()
                    step()
                    times.append(time.perf_counter() - t)
                rounds[name].append(1e3 * float(np.median(times)))
        rows = [dict(system=k, nodes=nodes[k], step_ms=float(np.median(v)), rounds_ms=v, **agree[k]) for k, v in rounds.items()]
        for r in rows:
            print(f"{r['system']:55s} {r['nodes']:5d} nodes  {r['step_ms']:7.2f} ms  max|diff| {r['max_abs_diff']:.2e}  "
                  f"argmax same {r['argmax_same']}  rounds {[round(x, 2) for x in r['rounds_ms']]}")
        if args.json:
            import importlib.metadata as md

            versions = {}
            for pkg in ("onnxruntime", "onnx", "onnxscript", "openvino"):
                try:
                    versions[pkg] = md.version(pkg)
                except md.PackageNotFoundError:
                    pass
            flags = next((line.split(":", 1)[1].split() for line in open("/proc/cpuinfo") if line.startswith("flags")), [])
            Path(args.json).write_text(json.dumps(dict(
                onnx=str(src), tokens=args.tokens, threads=args.threads, rounds=args.rounds, steps=args.steps,
                date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), machine=platform.processor() or platform.machine(),
                cpu_flags=[f for f in flags if f.startswith(("avx", "fma", "f16c", "amx"))], versions=versions,
                rows=rows), indent=1))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
