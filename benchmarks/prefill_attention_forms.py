"""The prefill graph's decomposed attention in its two ONNX forms, timed in one process.

    python benchmarks/prefill_attention_forms.py --model smollm2 --tokens 128 --json out.json

"traced": ``pdcompile.ops.attention_grouped`` traced by a re-export of the phase graph (the
lowering before 2026-12-08); "translated": ``ort_attention.attention_onnx``, the op's own
ONNX translation, which lets the graph skip the re-export (each layer then builds its mask
from its own q's shape). Same phase graph, same inputs (batch 1, ``--tokens`` random ids),
two ONNX Runtime sessions; logits must agree; interleaved rounds of 5 runs, median run per
round, median over rounds.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pdcompile  # noqa: E402
from pdcompile.backends import onnxruntime as ort_backend  # noqa: E402
from pdcompile.backends.program import copy_graph_module  # noqa: E402
from pdcompile.cli import load_model  # noqa: E402
from pdcompile.cost import example_inputs  # noqa: E402
from pdcompile.ops import attention_grouped  # noqa: E402
from pdcompile.passes.utils import ATTENTION  # noqa: E402


def traced_model(gm, ctx):
    """The prefill as lowered before: attention_grouped in the graph, traced by the re-export."""
    table = ort_backend.translation_table
    gm = copy_graph_module(gm)
    for node in gm.graph.nodes:
        if node.target is ATTENTION:
            node.target = attention_grouped
    ort_backend.translation_table = lambda: {k: v for k, v in table().items() if k is not ATTENTION}
    ort_backend._registry.cache_clear()
    try:
        return ort_backend.onnx_ir_model(gm, ctx)
    finally:
        ort_backend.translation_table = table
        ort_backend._registry.cache_clear()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    model, _ = load_model(args.model)
    cfg = pdcompile.OptimizeConfig(backend="onnxruntime")
    _, graphs, _, _ = pdcompile.api.transform(model, cfg, max(2048, args.tokens + 16), {})
    g = graphs["prefill"]
    models = {"traced": traced_model(g.gm, g.ctx), "translated": ort_backend.onnx_ir_model(g.gm, g.ctx)}
    cpu = torch.device("cpu")
    phases = {k: ort_backend.OrtPhase(ort_backend.session_model(m, cpu), g.ctx.signature, cpu) for k, m in models.items()}
    inputs = example_inputs(g.ctx.signature, 1, args.tokens, args.tokens + 16)
    inputs[0] = torch.randint(3, min(model.config.vocab_size, 32000), inputs[0].shape,
                              generator=torch.Generator().manual_seed(0))
    logits = {k: ph(*[a.clone() for a in inputs]).clone() for k, ph in phases.items()}
    diff = (logits["traced"] - logits["translated"]).abs().max().item()
    times = {k: [] for k in phases}
    for r in range(args.rounds):
        for name in (("traced", "translated") if r % 2 == 0 else ("translated", "traced")):
            run = [a.clone() for a in inputs]
            ts = []
            for _ in range(5):
                t = time.perf_counter()
                phases[name](*run)
                ts.append(time.perf_counter() - t)
            times[name].append(statistics.median(ts) * 1e3)
    result = {"model": args.model, "tokens": args.tokens, "max_abs_logit_diff": diff,
              "nodes": {k: len(list(m.graph)) for k, m in models.items()},
              "median_ms": {k: statistics.median(v) for k, v in times.items()}, "rounds_ms": times,
              "machine": platform.processor() or platform.machine(), "torch": torch.__version__}
    print(json.dumps({k: result[k] for k in ("model", "tokens", "max_abs_logit_diff", "nodes", "median_ms")}))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
