"""Issue 14 part 2 ("compile one layer, reuse it"): which optimize() stages grow with the
layer count, and what torch's regional compilation would save on inductor.

    python benchmarks/layer_scaling.py [--layers 4 16] [--backends inductor onnxruntime]

For each layer count, on a tiny Llama (hidden 64, random weights), in a fresh process with
empty caches (pdcompile's compile cache off, inductor's FX graph cache off):

* ``optimize(model, backend=B, prefix_cache=False)``: each stage's seconds (capture, passes,
  compile per phase) -- the per-layer slope of a stage is what one-graph-per-layer would save;
* HF's forward (32-token prompt, no cache) under ``torch.compile(model)`` against regional
  compilation (``layer.compile()`` on each decoder layer: torch compiles the first layer and
  reuses its code for the others): the first call's seconds (cold compile), the graphs
  compiled, and the median of 20 later calls (the price of a graph break per layer).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, statistics, sys, time
import torch, transformers as tf
layers, what = int(sys.argv[1]), sys.argv[2]
torch.manual_seed(0)
model = tf.LlamaForCausalLM(tf.LlamaConfig(
    hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=256, initializer_range=0.1, max_position_embeddings=512)).eval()
out = {"layers": layers, "what": what}
if what.startswith("optimize:"):
    import pdcompile
    t = time.perf_counter()
    fast = pdcompile.optimize(model, backend=what.split(":")[1], prefix_cache=False, max_seq_len=256, cache=False)
    out["total_s"] = time.perf_counter() - t
    out["stages"] = fast.pdcompile_report().timings
else:
    import torch._inductor.config as inductor_config
    from torch._dynamo.utils import counters
    inductor_config.fx_graph_cache = False
    if what == "whole":
        fn = torch.compile(model)
    else:  # regional
        for layer in model.model.layers:
            layer.compile()
        fn = model
    ids = torch.randint(0, 256, (1, 32))
    with torch.no_grad():
        t = time.perf_counter()
        ref = fn(ids, use_cache=False).logits
        out["first_call_s"] = time.perf_counter() - t
        steps = []
        for _ in range(20):
            t = time.perf_counter()
            fn(ids, use_cache=False)
            steps.append(time.perf_counter() - t)
        out["call_ms"] = statistics.median(steps) * 1e3
        out["graphs"] = counters["stats"]["unique_graphs"]
        with torch.compiler.set_stance("force_eager"):
            eager = model(ids, use_cache=False).logits
        out["max_abs_diff_vs_eager"] = float((ref - eager).abs().max())
print(json.dumps(out))
"""


def run(layers: int, what: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(layers), what], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, nargs="*", default=[4, 16])
    ap.add_argument("--backends", nargs="*", default=["inductor", "onnxruntime"])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    results = []
    for layers in args.layers:  # interleaved: every variant at one layer count before the next
        for what in ["whole", "regional"] + [f"optimize:{b}" for b in args.backends]:
            r = run(layers, what)
            results.append(r)
            print(json.dumps(r), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
