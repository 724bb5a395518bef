"""Compute in float32 a graph whose weights and KV cache are bfloat16 or float16 (lowering step).

For engines without 16-bit kernels (ONNX Runtime's CPU provider has no bfloat16 MatMul,
Mul, Add, Softmax, ...). The weights and the KV cache keep their 16-bit storage: each
is cast to float32 where arithmetic first reads it, and values written into a 16-bit
cache are cast back. Every ``dtype=bfloat16`` argument (HF's ``.to(input_dtype)`` casts,
constant tensors) becomes float32, so the whole computation runs in float32 and the
logits come out float32.

Data movement (views, reshapes, indexing, the embedding lookup) reads bfloat16 as it is,
so that only the rows and blocks used are converted, never a whole embedding table or
KV pool; ``pdcompile::paged_attention`` keeps its 16-bit pools and the lowering converts
the blocks it gathers.

Numerics: float32 arithmetic on 16-bit weights is at least as precise as 16-bit
arithmetic; results differ from a 16-bit run within its rounding, not bit for bit.
"""

from __future__ import annotations

import torch
from torch.utils import _pytree as pytree

from .utils import PAGED_ATTENTION, aten, val

# Ops that move or select elements without arithmetic: their output keeps the input's dtype.
_MOVES = {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.transpose.int, aten.permute.default,
    aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.expand.default, aten.slice.Tensor,
    aten.select.int, aten.index.Tensor, aten.embedding.default, aten.alias.default, aten.t.default,
    aten.clone.default, aten.contiguous.default,
}
# In-place writes: (destination arg, value arg)
_WRITES = {aten.index_put_.default: (0, 2), aten.index_copy_.default: (0, 3), aten.copy_.default: (0, 1)}


def compute_in_float32(gm: torch.fx.GraphModule, low: torch.dtype = torch.bfloat16) -> int:
    """Rewrite ``gm`` in place; returns how many casts were inserted (0: nothing was ``low``)."""
    graph = gm.graph
    dtype: dict[torch.fx.Node, torch.dtype | None] = {}  # each node's dtype after the rewrite
    casts: dict[tuple[torch.fx.Node, torch.dtype], torch.fx.Node] = {}

    def cast(node: torch.fx.Node, to: torch.dtype, before: torch.fx.Node) -> torch.fx.Node:
        key = (node, to)
        if key not in casts:  # made before its first reader, reused by the later ones
            with graph.inserting_before(before):
                casts[key] = graph.call_function(aten._to_copy.default, (node,), {"dtype": to})
            dtype[casts[key]] = to
            if isinstance(val(node), torch.Tensor):  # metadata only: a fake tensor's cast allocates nothing
                casts[key].meta["val"] = val(node).to(to)
        return casts[key]

    for node in list(graph.nodes):
        v = val(node)
        original = v.dtype if isinstance(v, torch.Tensor) else None
        if node.op in ("placeholder", "get_attr"):
            if node.op == "get_attr":
                attr = getattr(gm, node.target, None)
                original = attr.dtype if isinstance(attr, torch.Tensor) else original
            dtype[node] = original
            continue
        if node.op != "call_function" or node in dtype:
            continue
        if node.kwargs.get("dtype") == low:
            node.update_kwarg("dtype", torch.float32)
        tensor_args = [a for a in pytree.tree_leaves((node.args, node.kwargs)) if isinstance(a, torch.fx.Node)]
        if node.target in _MOVES:
            first = next((a for a in tensor_args), None)
            dtype[node] = dtype.get(first, original) if original in (low, torch.float32) else original
            continue
        if node.target in _WRITES:
            dest, value = (node.args[i] for i in _WRITES[node.target])
            if isinstance(value, torch.fx.Node) and dtype.get(value) != dtype.get(dest):
                node.update_arg(_WRITES[node.target][1], cast(value, dtype[dest], node))
            dtype[node] = dtype.get(dest)
            continue
        low_args = {a for a in tensor_args if dtype.get(a) == low}
        if node.target is PAGED_ATTENTION:
            # the pools are read through the block table: the lowering casts the gathered
            # blocks (ops.paged_attention_grouped, ort_attention.paged_attention_onnx), never
            # a whole pool per step
            low_args -= {node.args[1], node.args[2]}
        if low_args:
            replacements = {a: cast(a, torch.float32, node) for a in low_args}
            node.args = pytree.tree_map(lambda a: replacements.get(a, a) if isinstance(a, torch.fx.Node) else a,
                                        node.args)
            node.kwargs = pytree.tree_map(lambda a: replacements.get(a, a) if isinstance(a, torch.fx.Node) else a,
                                          node.kwargs)
        dtype[node] = torch.float32 if original == low else original
    # Not refreshing every node's metadata here (FakeTensorProp): it would evaluate the casts of
    # the real weights, a float32 copy of the model. Re-exporting the graph recomputes it.
    gm.recompile()
    return len(casts)
