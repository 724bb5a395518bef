"""The reference backend: run the transformed FX graph as it is.

No compilation: every aten op and every ``pdcompile::`` op runs its eager kernel.
It is what the other backends are checked against, and what to use when debugging a
pass (``PDCOMPILE_DUMP_DIR`` shows the graphs it runs). It has no engine file format.

One exception, for speed without a change of result: the bf16 linear layers of
``prefill_dtype="bfloat16"`` (the bf16_matmuls pass) call oneDNN on weights reordered
once into its blocked layout (``torch.ops.mkldnn._linear_pointwise``, the op inductor's
CPU freezing emits for the same layers), where ``aten.linear`` reorders them on every
call. Measured here (AMX CPU, 2 threads): 1.45x faster for 128-token products, results
bit-identical (BENCHMARKS.md, bf16 prefill). This is also the phase the onnxruntime
backend hands to eager, its CPU provider having no bf16 matmul.
"""

from __future__ import annotations

import weakref

import torch

from ..passes.utils import constant_linears, derived_once
from . import Backend
from .program import copy_graph_module

# bf16 weight -> its oneDNN-blocked copy, shared by the phases (prefill, extend, score) that
# read the same bf16 copy (utils.derived_once)
_PACKED: "weakref.WeakValueDictionary[tuple, torch.Tensor]" = weakref.WeakValueDictionary()
ROWS_HINT = 128  # the product's row count oneDNN picks its blocking for (a prompt's tokens)


def prepack_bf16_linears(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of ``gm`` whose bf16 ``aten.linear`` on constant weights call oneDNN on
    pre-reordered weights (``gm`` itself is left as it is: export() reads it)."""
    gm = copy_graph_module(gm)
    for node, x, w, weight, bias in constant_linears(gm):
        x_val = x.meta.get("val") if isinstance(x, torch.fx.Node) else None
        if weight.dtype != torch.bfloat16 or getattr(x_val, "dtype", None) != torch.bfloat16:
            continue
        name = "onednn_" + w.target.replace(".", "_")
        packed = derived_once(_PACKED, weight, lambda w: torch.ops.mkldnn._reorder_linear_weight(w, ROWS_HINT))
        gm.register_buffer(name, packed, persistent=False)  # an opaque mkldnn tensor: never saved
        with gm.graph.inserting_before(node):
            packed_attr = gm.graph.get_attr(name)
        node.target = torch.ops.mkldnn._linear_pointwise.default
        node.args, node.kwargs = (x, packed_attr, bias, "none", [], ""), {}
    gm.recompile()
    return gm


class EagerBackend(Backend):
    name = "eager"
    exportable = False
    native_code = False

    def lower(self, gm: torch.fx.GraphModule, ctx) -> torch.fx.GraphModule:
        if (ctx.matmul_dtype is torch.bfloat16 and ctx.device.type == "cpu" and torch.backends.mkldnn.is_available()
                and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
            return prepack_bf16_linears(gm)
        return gm
