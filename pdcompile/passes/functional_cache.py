"""Functional cache writes (lowering to ONNX / TensorRT): in-place writes -> outputs.

ONNX and TensorRT graphs are functional: a write into a graph input is invisible to
the caller. This rewrite makes every cache write produce a new tensor, routes later
reads of the cache to it, and returns the updated caches after the logits. The
runtime then binds each "present" output to the same buffer as its "past" input
(ONNX Runtime's ScatterND writes in place when they alias: no copy of the cache).

Before::

    index_copy_(caches_0, 2, arange(S), k)                 # prefill
    index_put_(caches_0, [rows, None, pos], k[:, :, 0])    # decode; attention reads its result
    return logits

After::

    present_0 = index_put(caches_0, [rows[:, None, None], heads[None, :, None], slots], k)
    ... attention reads present_0 ...
    return (logits, present_0, present_1, ...)

All writes become ``index_put`` with one index per leading axis (batch, head, slot),
which exports to a single ScatterND over the cache as laid out -- no transposes.
This is a lowering step run by the backends that need it, not a pipeline pass.
"""

from __future__ import annotations

import torch

from ..phase import STATE_ROLES, PhaseSignature
from .utils import aten, val

_INPLACE = {aten.index_copy_.default, aten.index_put_.default}


def _full_indices(graph, cache: torch.fx.Node, node: torch.fx.Node):
    """(indices over batch, head, slot; values [B, H, S, D]) for a cache write node."""
    if node.target is aten.index_put_.default and all(i is not None for i in node.args[1]):
        return list(node.args[1]), node.args[2]
    cv = val(cache)
    device = cv.device
    batch = graph.call_function(aten.sym_size.int, (cache, 0))
    heads = int(cv.shape[1])
    rows = graph.call_function(aten.arange.default, (batch,), {"device": device})
    head_idx = graph.call_function(aten.arange.default, (heads,), {"device": device})
    if node.target is aten.index_copy_.default:
        _, dim, slots, src = node.args
        assert dim == 2, "cache writes are along the slot axis"
        rows = graph.call_function(aten.view.default, (rows, [-1, 1, 1]))
        head_idx = graph.call_function(aten.view.default, (head_idx, [1, -1, 1]))
        slots = graph.call_function(aten.view.default, (slots, [1, 1, -1]))
        return [rows, head_idx, slots], src
    _, indices, values = node.args
    if all(i is not None for i in indices):  # already one index per leading axis (paged pools)
        return list(indices), values
    if len(indices) != 3 or indices[1] is not None:
        raise NotImplementedError(f"cache write {node.name} with indices {indices} is not [rows, :, slots]")
    rows, _, slots = indices
    rows = graph.call_function(aten.view.default, (rows, [-1, 1]))
    head_idx = graph.call_function(aten.view.default, (head_idx, [1, -1]))
    slots = graph.call_function(aten.view.default, (slots, [-1, 1]))
    return [rows, head_idx, slots], values


def functionalize_cache_writes(gm: torch.fx.GraphModule, signature: PhaseSignature) -> torch.fx.GraphModule:
    """Rewrite ``gm`` in place as described above; return it."""
    graph = gm.graph
    nodes = signature.nodes(gm)
    caches = [n for role in STATE_ROLES for n in nodes[role]]
    latest = {c: c for c in caches}
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in _INPLACE:
            continue
        cache = node.args[0]
        if cache not in latest:
            raise NotImplementedError(f"in-place write {node.name} to {cache} which is not a cache input")
        with graph.inserting_before(node):
            indices, values = _full_indices(graph, cache, node)
            new = graph.call_function(aten.index_put.default, (latest[cache], indices, values))
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        latest[cache] = new
        # later readers of the cache input see the written version
        for user in list(cache.users):
            if user is not new and _after(user, new):
                user.replace_input_with(cache, new)
    out = graph.output_node()
    logits = out.args[0]
    out.args = ((logits, *[latest[c] for c in caches]),)
    graph.lint()
    gm.recompile()
    return gm


def _after(a: torch.fx.Node, b: torch.fx.Node) -> bool:
    n = b.next
    while n.op != "root":
        if n is a:
            return True
        n = n.next
    return False
