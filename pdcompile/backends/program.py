"""A transformed phase graph as a fresh ``ExportedProgram`` (for AOTInductor, ONNX, TensorRT).

The passes work on a plain FX GraphModule; ahead-of-time backends want an
ExportedProgram with the phase's dynamic dimensions. Re-exporting the (straight-line,
aten-level) graph is fast and keeps every ``pdcompile::`` op for the backend to lower.
"""

from __future__ import annotations

import torch

from ..cost import example_inputs
from ..passes.functional_cache import functionalize_cache_writes
from ..phase import PassContext


def copy_graph_module(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A new GraphModule with its own graph; parameters are shared, not copied."""
    graph = torch.fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    return torch.fx.GraphModule(gm, graph)


def export_program(gm: torch.fx.GraphModule, ctx: PassContext, functional: bool = False) -> torch.export.ExportedProgram:
    """Export ``gm`` (left untouched) with the phase's dynamic dims (from its signature);
    optionally with functional cache writes (updated caches returned after the logits)."""
    sig = ctx.signature
    gm = copy_graph_module(gm)
    if functional:
        functionalize_cache_writes(gm, sig)
    # Example sizes inside the declared ranges, distinct and > 1 (see capture.py); batch 3
    # whatever max_batch_size is (the Dim range covers it): with 2, the batch would equal
    # the example block table's 2 blocks and export would tie the two dims together.
    prompt = min(5, ctx.max_seq_len - 1)
    # On the graph's device: a CUDA model's weights do not mix with CPU example inputs.
    device = next(n.meta["val"].device for n in gm.graph.nodes if n.op == "placeholder")
    capacity = min(23, max(ctx.max_seq_len, 3))
    if sig.block_size:  # at least two blocks per row: a block table one block wide would be specialised
        capacity = max(2 * sig.block_size, prompt + 2)
    args = example_inputs(sig, 3, prompt, capacity, device=device)
    with torch.no_grad():
        return torch.export.export(gm, tuple(args), dynamic_shapes=sig.export_dims(ctx.max_batch_size, ctx.max_seq_len),
                                   strict=False)
