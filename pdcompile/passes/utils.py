"""Graph helpers shared by the passes (each used by at least two of them)."""

from __future__ import annotations

import math
from typing import Callable

import torch

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default
ATTENTION = torch.ops.pdcompile.attention.default
PAGED_ATTENTION = torch.ops.pdcompile.paged_attention.default

_SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}


def sdpa_args(node: torch.fx.Node) -> dict:
    """Arguments of an aten SDPA node by name, defaults filled in."""
    out = dict(_SDPA_DEFAULTS)
    out.update(zip(_SDPA_PARAMS, node.args))
    out.update(node.kwargs)
    return out


class MaskContractError(RuntimeError):
    """A captured attention mask does not express the phase contract."""


def attr(gm: torch.fx.GraphModule, target: str):
    """The object a get_attr ``target`` ("layers.0.weight") names on ``gm``."""
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def derived_once(cache, weight: torch.Tensor, make):
    """``make(weight)``, computed once per weight while a graph holds the result: ``cache`` is a
    ``weakref.WeakValueDictionary`` keyed by the weight's storage, offset, shape and version
    (the phases' graphs share one model's parameters, so equal keys are one tensor; a graph
    holding the result also holds the weight, so its storage is not reused meanwhile)."""
    key = (weight.untyped_storage().data_ptr(), weight.storage_offset(), tuple(weight.shape), weight._version)
    result = cache.get(key)
    if result is None:
        result = cache[key] = make(weight.detach())
    return result


def constant_linears(gm: torch.fx.GraphModule):
    """``(node, x, w, weight, bias)`` for each ``aten.linear`` of ``gm`` whose weight is a 2-D
    tensor constant of the graph (``w``, a get_attr node; ``weight``, its tensor), whatever the
    layer is called. A snapshot of the graph's nodes: callers may rewrite the node they get."""
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not aten.linear.default:
            continue
        x, w = node.args[0], node.args[1]
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        if not isinstance(w, torch.fx.Node) or w.op != "get_attr":
            continue
        weight = attr(gm, w.target)
        if isinstance(weight, torch.Tensor) and weight.dim() == 2:
            yield node, x, w, weight, bias


def val(node) -> torch.Tensor | None:
    return node.meta.get("val") if isinstance(node, torch.fx.Node) else None


def default_scale(q: torch.fx.Node, scale) -> float:
    return scale if scale is not None else 1.0 / math.sqrt(int(val(q).shape[-1]))


def strip_repeat_kv(node: torch.fx.Node) -> torch.fx.Node:
    """``reshape(expand(unsqueeze(x, 2), [B, Hkv, rep, S, D]), [B, Hkv*rep, S, D])`` -> ``x``.

    That is HF's ``repeat_kv`` (grouped-query attention) as exported; the canonical
    attention op reads the kv heads directly, so the copy it makes is dropped.
    """
    if node.op != "call_function" or node.target not in (aten.reshape.default, aten.view.default, aten._unsafe_view.default):
        return node
    expand = node.args[0]
    if not isinstance(expand, torch.fx.Node) or expand.target is not aten.expand.default:
        return node
    unsq = expand.args[0]
    if not isinstance(unsq, torch.fx.Node) or unsq.target is not aten.unsqueeze.default or unsq.args[1] != 2:
        return node
    src = unsq.args[0]
    sv, ov = val(src), val(node)
    if sv is None or ov is None or sv.dim() != 4 or ov.dim() != 4:
        return node
    heads, out_heads = int(sv.shape[1]), int(ov.shape[1])
    if out_heads % heads or tuple(ov.shape[2:]) != tuple(sv.shape[2:]):
        return node
    return src


def backward_slice(node: torch.fx.Node) -> list[torch.fx.Node]:
    """``node`` and all its ancestors, in graph order."""
    seen: set[torch.fx.Node] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return [n for n in node.graph.nodes if n in seen]


def shape_only_placeholders(nodes: list[torch.fx.Node]) -> tuple[set[str], set[str]]:
    """(placeholders whose values the slice reads, placeholders it reads only the shape of)."""
    inside = set(nodes)
    values, shapes = set(), set()
    for n in nodes:
        if n.op != "placeholder":
            continue
        users = [u for u in n.users if u in inside]
        if users and all(u.target is aten.sym_size.int for u in users):
            shapes.add(n.name)
        else:
            values.add(n.name)
    return values, shapes


def slice_reads_params(nodes: list[torch.fx.Node]) -> bool:
    return any(n.op == "get_attr" for n in nodes) or any(n.op == "call_module" for n in nodes)


def evaluate_slice(gm: torch.fx.GraphModule, out: torch.fx.Node, inputs: dict[str, torch.Tensor]):
    """Run the sub-graph that computes ``out`` on concrete ``inputs`` (by placeholder name)."""
    nodes = backward_slice(out)
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    names = []
    for n in nodes:
        if n.op == "placeholder":
            env[n] = graph.placeholder(n.name)
            names.append(n.name)
        else:
            env[n] = graph.node_copy(n, lambda a: env[a])
    graph.output(env[out])
    sub = torch.fx.GraphModule(gm, graph)
    return sub(*[inputs[name] for name in names])


def keep_mask(mask: torch.Tensor) -> torch.Tensor:
    """A bool "may attend" mask from a bool mask or an additive float mask."""
    if mask.dtype == torch.bool:
        return mask
    return mask > torch.finfo(mask.dtype).min / 2


def replace_with_attention(
    gm: torch.fx.GraphModule, sdpa: torch.fx.Node, q_pos: torch.fx.Node | None, window: int
) -> torch.fx.Node:
    """Swap an aten SDPA node for ``pdcompile::attention`` (kv heads read directly)."""
    a = sdpa_args(sdpa)
    k, v = strip_repeat_kv(a["key"]), strip_repeat_kv(a["value"])
    with gm.graph.inserting_before(sdpa):
        new = gm.graph.call_function(
            ATTENTION, (a["query"], k, v, q_pos, default_scale(a["query"], a["scale"]), window)
        )
    new.meta.update(sdpa.meta)
    sdpa.replace_all_uses_with(new)
    gm.graph.erase_node(sdpa)
    return new


def first_visible_mismatch(
    keep: torch.Tensor, expected: Callable[[int, int, int], bool], rows_queries: list[tuple[int, list[int]]]
) -> str | None:
    """Compare a [B, *, Sq, Sk] keep-mask with ``expected(b, i, j)`` on the given rows/queries."""
    keep = keep.expand(keep.shape[0], 1, keep.shape[-2], keep.shape[-1]) if keep.dim() == 4 else keep
    for b, queries in rows_queries:
        row = keep[b if keep.shape[0] > 1 else 0]
        for head in range(row.shape[0]):
            for i in queries:
                got = row[head, i].tolist()
                want = [expected(b, i, j) for j in range(row.shape[-1])]
                if got != want:
                    return f"row {b} query {i}: keeps {[j for j, x in enumerate(got) if x]}, expected {[j for j, x in enumerate(want) if x]}"
    return None


def fuse_if_contract(gm: torch.fx.GraphModule, sdpa: torch.fx.Node, q_pos: torch.fx.Node | None, verdicts: dict,
                     declined: list, **verify) -> bool:
    """Replace ``sdpa`` by the canonical attention if its mask is the phase contract.

    ``verdicts`` caches each mask sub-graph's window (-1: not a candidate; masks are shared
    by layers), ``declined`` collects why a mask was not; ``verify`` goes to :func:`mask_window`.
    """
    mask = sdpa_args(sdpa)["attn_mask"]
    if mask not in verdicts:
        verdict = mask_window(gm, mask, **verify)
        if isinstance(verdict, str):
            declined.append(f"{sdpa.name}: {verdict}")
            verdict = -1
        verdicts[mask] = verdict
    if verdicts[mask] < 0:
        return False
    replace_with_attention(gm, sdpa, q_pos, verdicts[mask])
    return True


def mask_window(gm: torch.fx.GraphModule, mask: torch.fx.Node, allowed: set[str], samples, check, infer_window,
                what: str) -> int | str:
    """Decide whether the mask sub-graph ``mask`` is the phase's position contract.

    Returns the sliding window it implements (0: none), or a sentence saying why it is
    not a candidate (it reads weights or inputs outside ``allowed``). A candidate is
    evaluated on ``samples(nodes)`` -> (inputs by placeholder name, expected rows) and
    compared by ``check(keep, expected, window)``; a window is inferred once from the
    first mismatch by ``infer_window(keep, expected)``. A candidate that still
    contradicts the contract raises :class:`MaskContractError` (``what`` says which).
    """
    nodes = backward_slice(mask)
    values, _ = shape_only_placeholders(nodes)
    if slice_reads_params(nodes) or not values <= allowed:
        return f"mask depends on {sorted(values - allowed) or 'weights'}"
    window, problem = 0, None
    for inputs, expected in samples(nodes):
        keep = keep_mask(evaluate_slice(gm, mask, inputs))
        problem = check(keep, expected, window)
        if problem and not window:
            window = infer_window(keep, expected)
            problem = check(keep, expected, window) if window else problem
        if problem:
            raise MaskContractError(f"{what} ({problem})")
    return window
