"""Final-layer pruning (prefill): compute only what the last prompt token needs.

Prefill returns the logits of one position per row (``last_idx``). The graph ends in
``index(logits, [arange(B), last_idx])``, so everything between the last point where
all positions are needed and that gather is wasted on S-1 positions. The pass sinks
the gather up the graph, through every op that treats positions independently, and
stops where a value is also needed for all positions -- in a decoder layer that is
the K and V projections (the cache needs every position).

Before (last layer, Llama-like; [B, S, ...] everywhere)::

    h -> norm -> q_proj -> rope(q) ---------\\
              -> k_proj -> rope(k) -> cache -> attention(q, k, v, causal) -> o_proj -> +h
              -> v_proj ----------> cache -/                                  -> norm -> mlp -> +
                                                                              -> norm -> lm_head
                                                                              -> logits[arange(B), last_idx]
After::

    h -> norm -> k_proj/v_proj (all S positions, to the cache, unchanged)
    h_sel = select(h, last_idx); n_sel = select(norm(h), last_idx); cos/sin_sel = select(...)
    n_sel -> q_proj -> rope -> attention(q[B,H,1,D], k, v, q_pos=last_idx) -> o_proj -> +h_sel
          -> norm -> mlp -> + -> norm -> lm_head -> logits[B, V]

``select(x, last_idx)`` takes position ``last_idx[b]`` of row b (padding respected:
prompts are right-padded, see capture.py). The attention keeps one query per row and
all keys 0..last_idx[b]: exactly what causal attention gave that query.

Which ops the gather passes through (matched on aten ops and symbolic shapes: the
prompt length is the dynamic symbol ``S`` of ``input_ids``, so a tensor's position
axis is the dimension whose size is ``S``):
pointwise ops, dtype casts, reductions and softmax over other axes, ``linear`` on the
last axis, views that keep the position axis whole, transposes/permutes, slicing,
selecting and concatenating along other axes, and attention (in its query only; keys,
values and the key axis of a mask stay whole). A node joins only if *all* its users
have joined, so nothing another consumer needs at every position is ever shrunk.

Deliberately skipped: graphs whose output is not such a gather (the score graph
returns every position), and ops outside the list above (the gather stops there).
"""

from __future__ import annotations

import operator

import sympy
import torch

from torch.fx.node import map_aggregate

from ..phase import PassContext, Role
from .manager import GraphPass, PassResult
from .utils import ATTENTION, SDPA, aten, sdpa_args, val

NAME = "prune_final_layer"

_CASTS = {
    aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten._to_copy.default, aten.clone.default,
    aten.contiguous.default, aten.alias.default, aten.detach.default, aten.type_as.default,
}
_REDUCE_DIMS = {  # op -> index of its dim argument
    aten.mean.dim: 1, aten.sum.dim_IntList: 1, aten.amax.default: 1, aten.amin.default: 1,
    aten.var.correction: 1, aten.var_mean.correction: 1, aten._softmax.default: 1,
    aten.softmax.int: 1, aten._log_softmax.default: 1, aten.log_softmax.int: 1,
}
_NORMS = {aten.layer_norm.default, aten.rms_norm.default}  # normalize the trailing dims
_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
_SPLITS = {aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default}


def _expr(x):
    return x.node.expr if isinstance(x, torch.SymInt) else sympy.Integer(int(x))


class _Analysis:
    """Decides which nodes can be computed for the selected position only.

    A tensor's *position axis* is its one dimension whose size has the prompt-length
    symbol S as a factor: S itself, or B*S where a view merged batch and positions
    (GPT-2's Conv1D flattens to [B*S, D] around its matmul).
    """

    def __init__(self, sym):
        self.sym = sym

    def _tensor(self, node):
        v = val(node)
        if isinstance(v, (list, tuple)) and v and isinstance(v[0], torch.Tensor):
            return v[0]  # split outputs share the position axis
        return v if isinstance(v, torch.Tensor) else None

    def token_dim(self, node) -> int | None:
        t = self._tensor(node)
        if t is None:
            return None
        dims = [d for d, size in enumerate(t.shape) if self.sym in _expr(size).free_symbols]
        return dims[0] if len(dims) == 1 else None

    def clean(self, node) -> bool:
        """A tensor select_tokens can index: position axis of size exactly S, batch first."""
        t = val(node)
        d = self.token_dim(node)
        return isinstance(t, torch.Tensor) and d is not None and d > 0 and _expr(t.shape[d]) == self.sym

    def _mixed_size_arg(self, node) -> bool:
        """A size argument like B*S: after selection it would need a new symbolic node."""
        for a in _flat(node.args):
            v = val(a)
            if isinstance(v, torch.SymInt):
                e = v.node.expr
                if self.sym in e.free_symbols and not e.subs(self.sym, 1).is_number:
                    return True
        return False

    def _groups(self, t, d):
        """(number of (batch, ...) groups before each position, elements per position)."""
        before = sympy.Mul(*[_expr(s) for s in t.shape[: d + 1]]) / self.sym
        after = sympy.Mul(*[_expr(s) for s in t.shape[d + 1:]])
        return before, after

    def selectable_inputs(self, node: torch.fx.Node) -> set[torch.fx.Node] | None:
        """Inputs of ``node`` that may be position-selected, or None if ``node`` cannot join."""
        if node.op != "call_function" or self._mixed_size_arg(node):
            return None
        out_dim = self.token_dim(node)
        if out_dim is None:
            return None
        target, args = node.target, node.args
        tensors = {a for a in node.all_input_nodes if isinstance(val(a), torch.Tensor)}
        if target in (SDPA, ATTENTION):
            q = sdpa_args(node)["query"] if target is SDPA else args[0]
            return {q}
        if target is operator.getitem:
            return {args[0]} if args[0].target in _SPLITS else None
        if torch.Tag.pointwise in getattr(target, "tags", ()) or target in _CASTS:
            return tensors
        if target is aten.cat.default:
            dim = args[1] if len(args) > 1 else 0
            if any(self.token_dim(t) is None for t in args[0]):
                return None
            return set(args[0]) if dim % val(node).dim() != out_dim else None
        if target in (aten.addmm.default, aten.mm.default):
            x = args[1] if target is aten.addmm.default else args[0]
            xd = self.token_dim(x)
            other = [a for a in node.all_input_nodes if a is not x]
            return {x} if xd == 0 and all(self.token_dim(a) is None for a in other) else None
        x = args[0]
        xd = self.token_dim(x) if isinstance(x, torch.fx.Node) else None
        if xd is None:
            return None
        rank = val(x).dim()
        if target in _REDUCE_DIMS:
            i = _REDUCE_DIMS[target]
            dims = args[i] if len(args) > i else None
            if dims is None:
                return None
            dims = [dims] if isinstance(dims, int) else list(dims)
            return tensors if xd not in [d % rank for d in dims] else None
        if target in _NORMS:
            return {x} if xd < rank - len(args[1]) else None
        if target is aten.linear.default:
            return {x} if xd != rank - 1 else None
        if target in _VIEWS:
            # Position-preserving: same groups before the position and same elements per position.
            return {x} if self._groups(val(x), xd) == self._groups(val(node), out_dim) else None
        if target in (aten.transpose.int, aten.permute.default, aten.unsqueeze.default, aten.expand.default):
            return {x}
        if target in (aten.slice.Tensor, aten.select.int, aten.squeeze.dim):
            dim = args[1] if len(args) > 1 else 0
            return {x} if dim % rank != xd else None
        if target in _SPLITS:
            dim = args[2] if len(args) > 2 else node.kwargs.get("dim", 0)
            return {x} if dim % rank != xd else None
        return None


def _select_tokens(graph: torch.fx.Graph, x: torch.fx.Node, dim: int, idx: torch.fx.Node, rows: torch.fx.Node):
    """``x[b, ..., idx[b], ...]`` (idx at ``dim``), keeping ``dim`` as a size-1 axis."""
    xv = val(x)
    if not isinstance(xv.shape[0], torch.SymInt) and int(xv.shape[0]) == 1:
        # broadcast over the batch (e.g. rotary tables): give every row its own copy to index
        batch = graph.call_function(aten.sym_size.int, (idx, 0))
        x = graph.call_function(aten.expand.default, (x, [batch] + [-1] * (xv.dim() - 1)))
    # index(x, [rows, None.., idx]) -> [B, remaining dims...] (the batch axis first in both
    # the adjacent and the separated case); unsqueeze puts the position axis back.
    picked = graph.call_function(aten.index.Tensor, (x, [rows] + [None] * (dim - 1) + [idx]))
    return graph.call_function(aten.unsqueeze.default, (picked, dim))


def _flat(args):
    for a in args:
        if isinstance(a, (list, tuple)):
            yield from _flat(a)
        else:
            yield a


def _is_final_gather(node, last_idx) -> bool:
    if node.op != "call_function" or node.target is not aten.index.Tensor:
        return False
    indices = node.args[1]
    return len(indices) == 2 and indices[1] is last_idx and isinstance(indices[0], torch.fx.Node) \
        and indices[0].target is aten.arange.default


def prune_final_layer(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    graph = gm.graph
    ids, last_idx = ctx.signature.node(gm, Role.TOKENS), ctx.signature.node(gm, Role.LAST_IDX)
    if last_idx is None:
        return PassResult(gm, 0, "not a prefill graph (no last_idx input)")
    out = graph.output_node().args[0]
    if not isinstance(out, torch.fx.Node) or not _is_final_gather(out, last_idx):
        return PassResult(gm, 0, "output is not logits[arange(B), last_idx] (nothing to prune)")
    sym = val(ids).shape[1].node.expr if isinstance(val(ids).shape[1], torch.SymInt) else None
    if sym is None:
        return PassResult(gm, 0, "prompt length is static; cannot identify position axes")
    an = _Analysis(sym)
    start = out.args[0]
    if an.token_dim(start) != 1:
        return PassResult(gm, 0, "logits have no single position axis at dim 1")

    # Region: nodes computed for the selected position only. Walk in reverse order so
    # every user is decided before its producers; then shrink until every input that
    # stays outside the region is a tensor select_tokens can index.
    region: set[torch.fx.Node] = set()
    selectable: dict[torch.fx.Node, set[torch.fx.Node]] = {}
    nodes = list(graph.nodes)

    def users_ok(node):
        users = list(node.users)
        if node is start:
            return users == [out]
        return bool(users) and all(u in region and node in selectable[u] for u in users)

    for node in reversed(nodes[: nodes.index(out)]):
        sel = an.selectable_inputs(node)
        if sel is not None:
            selectable[node] = sel
            if users_ok(node):
                region.add(node)
    changed = True
    while changed:
        changed = False
        for node in list(region):
            boundary_ok = all(a in region or an.token_dim(a) is None or an.clean(a) for a in selectable[node])
            if node in region and not (users_ok(node) and boundary_ok):
                region.discard(node)
                changed = True
    if start not in region:
        return PassResult(gm, 0, "the logits producer is not position-wise")

    # Rewrite the region in graph order on one position per row.
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    selected: dict[tuple[torch.fx.Node, int], torch.fx.Node] = {}
    first = next(n for n in nodes if n in region)
    with graph.inserting_before(first):
        rows = graph.call_function(aten.arange.default, (graph.call_function(aten.sym_size.int, (last_idx, 0)),),
                                   {"device": val(last_idx).device})
    attention_rewrites = 0
    for node in nodes:
        if node not in region:
            continue
        with graph.inserting_before(out):

            def mapped(a, node=node):
                if not isinstance(a, torch.fx.Node):
                    if isinstance(a, torch.SymInt) and a.node.expr == sym:
                        return 1
                    return a
                if a in env:
                    return env[a]
                if a in selectable[node] and an.token_dim(a) is not None:
                    key = (a, an.token_dim(a))
                    if key not in selected:
                        selected[key] = _select_tokens(graph, a, key[1], last_idx, rows)
                    return selected[key]
                av = val(a)
                if isinstance(av, torch.SymInt) and sym in av.node.expr.free_symbols:
                    return int(av.node.expr.subs(sym, 1))  # a size argument: S becomes 1
                return a

            if node.target is SDPA or node.target is ATTENTION:
                attention_rewrites += 1
                if node.target is SDPA:
                    a = sdpa_args(node)
                    q = mapped(a["query"])
                    mask = a["attn_mask"]
                    if mask is None:
                        scale = a["scale"] if a["scale"] is not None else float(val(a["query"]).shape[-1]) ** -0.5
                        new = graph.call_function(ATTENTION, (q, a["key"], a["value"], last_idx, scale, 0))
                    else:  # keep the mask rows of the selected queries
                        m = _select_tokens(graph, mask, val(mask).dim() - 2, last_idx, rows)
                        new = graph.call_function(
                            SDPA, (q, a["key"], a["value"], m), {"scale": a["scale"], "enable_gqa": a["enable_gqa"]}
                        )
                else:
                    q, k, v, q_pos, scale, window = (list(node.args) + [0])[:6]
                    # the kept query is number last_idx[b] of the chunk: position q_pos[b] + last_idx[b]
                    kept = last_idx if q_pos is None else graph.call_function(aten.add.Tensor, (q_pos, last_idx))
                    new = graph.call_function(ATTENTION, (mapped(q), k, v, kept, scale, window))
            else:
                new = graph.call_function(node.target, map_aggregate(node.args, mapped), map_aggregate(node.kwargs, mapped))
            env[node] = new

    with graph.inserting_before(out):
        final = graph.call_function(aten.squeeze.dim, (env[start], 1))
    out.replace_all_uses_with(final)
    graph.erase_node(out)
    for node in reversed(nodes):
        if node in region:
            graph.erase_node(node)
    linears = sum(1 for n in region if n.target in (aten.linear.default, aten.addmm.default, aten.mm.default))
    detail = f"{len(region)} nodes on the last position only ({linears} matmuls, {attention_rewrites} attention)"
    return PassResult(gm, 1, detail)


PASS = GraphPass(NAME, prune_final_layer, __doc__)
