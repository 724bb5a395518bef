"""A transformed phase graph as a fresh ``ExportedProgram`` (for AOTInductor, ONNX, TensorRT).

The passes work on a plain FX GraphModule; ahead-of-time backends want an
ExportedProgram with the phase's dynamic dimensions. Re-exporting the (straight-line,
aten-level) graph is fast and keeps every ``pdcompile::`` op for the backend to lower.
"""

from __future__ import annotations

import torch

from ..cost import example_inputs
from ..passes.functional_cache import functionalize_cache_writes


def copy_graph_module(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A new GraphModule with its own graph; parameters are shared, not copied."""
    graph = torch.fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    return torch.fx.GraphModule(gm, graph)


def dynamic_shapes(gm: torch.fx.GraphModule, phase: str, max_batch_size: int, max_seq_len: int):
    batch = torch.export.Dim("batch", min=1, max=max(max_batch_size, 3))
    seq = torch.export.Dim("seq", min=1, max=max_seq_len)
    cap = torch.export.Dim("capacity", min=2, max=max(max_seq_len, 3))
    blocks = torch.export.Dim("kv_blocks_per_seq", min=1, max=max(max_seq_len, 2))
    pool = torch.export.Dim("kv_pool_blocks", min=2)
    shapes = []
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        if node.name == "input_ids":
            shapes.append({0: batch, 1: seq} if phase != "decode" else {0: batch})
        elif node.name in ("last_idx", "pos", "start"):
            shapes.append({0: batch})
        elif node.name == "block_table":
            shapes.append({0: batch, 1: blocks})
        elif node.name == "slot_mapping":
            shapes.append({0: batch} if phase == "decode" else {0: batch, 1: seq})
        elif node.name.startswith("pool_"):
            shapes.append({0: pool})
        else:
            shapes.append({0: batch, 2: cap})
    return tuple(shapes)


def export_program(
    gm: torch.fx.GraphModule, phase: str, max_batch_size: int, max_seq_len: int, functional: bool = False
) -> torch.export.ExportedProgram:
    """Export ``gm`` (left untouched) with the phase's dynamic dims; optionally with
    functional cache writes (updated caches returned after the logits)."""
    gm = copy_graph_module(gm)
    if functional:
        functionalize_cache_writes(gm)
    # Example sizes inside the declared ranges, distinct and > 1 (see capture.py).
    # always 3, whatever max_batch_size is (the Dim range covers it): with 2, the batch
    # would equal the example block table's 2 blocks and export ties the two dims together
    batch = 3
    prompt = min(5, max_seq_len - 1)
    # On the graph's device: a CUDA model's weights do not mix with CPU example inputs.
    device = next(n.meta["val"].device for n in gm.graph.nodes if n.op == "placeholder")
    args = example_inputs(gm, phase, batch, prompt, min(23, max(max_seq_len, 3)), device=device)
    with torch.no_grad():
        return torch.export.export(gm, tuple(args), dynamic_shapes=dynamic_shapes(gm, phase, max_batch_size, max_seq_len), strict=False)
