"""Pass-manager time per phase on a tiny Llama with many layers (default 30, SmolLM2's
count): the manager as it is (incremental metadata refresh) against a full fake-tensor
refresh after every pass, interleaved on copies of one capture, and where the manager's
time goes (metadata refresh, DCE + lint, the cost estimate, the final recompile, the
passes themselves).

    python benchmarks/pass_time.py [--layers 30] [--rounds 3]

Prints per phase the median seconds of the whole pipeline in both modes. Issue 14's target:
all passes of all phases of SmolLM2 in under 3 s. About 4 minutes on 2 cores (the capture of
three 30-layer graphs is about 2 of them).
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time

import torch
import transformers as tf

from pdcompile import api, cost
from pdcompile.backends.program import copy_graph_module
from pdcompile.capture import capture
from pdcompile.passes import manager


def _timed(fn, totals: collections.Counter, name: str):
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            totals[name] += time.perf_counter() - t0
    return wrapper


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=args.layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256, initializer_range=0.1, max_position_embeddings=512)).eval()
    config, seq = api._resolve_config(model, None, "eager", 8, 256, (), paged=True, block_size=16, prefix_cache=True,
                                      kv_cache_memory=None)
    t0 = time.perf_counter()
    cap = capture(model, 8, seq, phases=("prefill", "decode", "extend"))
    print(f"capture of 3 graphs: {time.perf_counter() - t0:.1f} s")
    incremental, cleanup, estimate, recompile = (manager.refresh_meta, manager.cleanup, cost.estimate_cost,
                                                 torch.fx.GraphModule.recompile)
    modes = {"full refresh": lambda gm: incremental(gm, full=True), "incremental (now)": incremental}
    times = {(m, p): [] for m in modes for p in cap.graphs}
    parts = collections.Counter()  # seconds over all rounds of the incremental mode
    for _ in range(args.rounds):
        for mode, refresh in modes.items():
            # graphs of their own (node metadata copied), made before the timers go in
            copies = {phase: copy_graph_module(gm) for phase, (gm, _) in cap.graphs.items()}
            # run_pipeline looks these up in their modules at each call
            manager.refresh_meta = _timed(refresh, parts, "metadata refresh") if mode != "full refresh" else refresh
            if mode != "full refresh":
                manager.cleanup = _timed(cleanup, parts, "DCE + lint")
                cost.estimate_cost = _timed(estimate, parts, "cost estimate")
                torch.fx.GraphModule.recompile = _timed(recompile, parts, "recompile")
            try:
                for phase, (_, sig) in cap.graphs.items():
                    t0 = time.perf_counter()
                    api.run_phase_pipeline(copies[phase], sig, config, seq, torch.device("cpu"))
                    times[mode, phase].append(time.perf_counter() - t0)
            finally:
                manager.refresh_meta, manager.cleanup, cost.estimate_cost = incremental, cleanup, estimate
                torch.fx.GraphModule.recompile = recompile
    for mode in modes:
        per = {p: statistics.median(times[mode, p]) for p in cap.graphs}
        print(f"{mode:24s} " + ", ".join(f"{p} {t:.2f} s" for p, t in per.items()) + f"; total {sum(per.values()):.2f} s")
    total = sum(sum(times["incremental (now)", p]) for p in cap.graphs)
    parts["passes themselves (rest)"] = total - sum(parts.values())
    print("incremental, all phases, mean per round: " + ", ".join(
        f"{name} {secs / args.rounds:.2f} s" for name, secs in parts.items()))
    print(f"({len(cap.graphs['prefill'][0].graph.nodes)} prefill nodes, {args.layers} layers, "
          f"{torch.get_num_threads()} threads, median of {args.rounds} rounds)")


if __name__ == "__main__":
    main()
