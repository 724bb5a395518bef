"""Remove ops that do nothing at this graph's dtypes and devices.

HF code casts defensively (``hidden.to(input_dtype)`` in every norm), aliases
(``logits_to_keep`` slicing), and scales rotary tables by an ``attention_scaling``
that is 1.0 for plain RoPE. In an fp32 graph these are no-ops, but each is a node
every backend traces, compiles or interprets.

Before::                                After::

    a = aten.to.dtype(x, float32)           (uses of a, b, c read x)
    b = aten.alias.default(x)
    c = aten.mul.Tensor(x, 1.0)

Only exact no-ops go: a cast to the dtype (and device) the tensor already has, alias,
multiplication by 1 / addition of 0 where the result has x's shape and dtype, and
a slice covering a whole axis. Casts that change the dtype (fp16/bf16 models) stay.
"""

from __future__ import annotations

import torch

from .manager import GraphPass, PassResult
from .utils import aten, val

NAME = "remove_noops"

_INT_MAX = 2**63 - 1
_CANDIDATES = {aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten._to_copy.default, aten.alias.default,
               aten.mul.Tensor, aten.add.Tensor, aten.sub.Tensor, aten.slice.Tensor}


def _same(a, b) -> bool:
    va, vb = val(a), val(b)
    return (
        isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor)
        and va.dtype == vb.dtype and va.device == vb.device and tuple(va.shape) == tuple(vb.shape)
    )


def _noop_input(node: torch.fx.Node) -> torch.fx.Node | None:
    """The input ``node`` passes through unchanged, if it is a no-op."""
    if node.op != "call_function" or not node.args or not isinstance(node.args[0], torch.fx.Node):
        return None
    x, t = node.args[0], node.target
    if t not in _CANDIDATES or not _same(node, x):  # targets first: comparing symbolic shapes costs more
        return None
    if t in (aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten._to_copy.default, aten.alias.default):
        copy = node.kwargs.get("copy", False) or (len(node.args) > 3 and node.args[3] is True)
        return None if copy else x
    if t is aten.mul.Tensor and node.args[1] == 1:
        return x
    if t in (aten.add.Tensor, aten.sub.Tensor) and node.args[1] == 0 and node.kwargs.get("alpha", 1) == 1:
        return x
    if t is aten.slice.Tensor:
        start = node.args[2] if len(node.args) > 2 else 0
        end = node.args[3] if len(node.args) > 3 else _INT_MAX
        step = node.args[4] if len(node.args) > 4 else 1
        if start in (0, None) and step == 1 and (end is None or (isinstance(end, int) and end >= _INT_MAX)):
            return x
    return None


def remove_noops(gm: torch.fx.GraphModule, ctx=None) -> PassResult:
    removed = 0
    for node in list(gm.graph.nodes):
        src = _noop_input(node)
        if src is not None:
            node.replace_all_uses_with(src)
            gm.graph.erase_node(node)
            removed += 1
    return PassResult(gm, removed, f"{removed} no-op casts/aliases/scalings removed" if removed else "none found")


PASS = GraphPass(NAME, remove_noops, __doc__)
