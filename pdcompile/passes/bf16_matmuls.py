"""Prefill's linear layers in bfloat16 (``OptimizeConfig.prefill_dtype="bfloat16"``).

Before::                                    After::

    w = get_attr[weight]       # fp32          w16 = get_attr[weight_bf16]     # bf16 copy
    y = aten.linear(x, w, b)   # fp32          x16 = aten._to_copy(x, dtype=bf16)  # shared by q/k/v
                                               y16 = aten.linear(x16, w16, b16)
                                               y = aten._to_copy(y16, dtype=fp32)

Prefill multiplies a whole prompt by every weight: compute-bound, where a CPU with
AVX-512 BF16 or AMX runs bfloat16 matrix products several times faster than float32
ones (oneDNN, through aten.linear; BENCHMARKS.md). Only the linear layers change:
norms, rotary, softmax, the residual stream and the KV cache stay float32, so the
cache prefill writes is the one decode reads, and decode keeps its own precision.
Each product accumulates in float32; its inputs and its output are rounded to
bfloat16 (8 bits of mantissa), which moves logits by about a percent: greedy tokens can
differ from float32's after a while, as with every engine's bf16 mode. It is an option,
off by default.

Matches ``aten.linear`` whose weight is a 2-D float32 constant of the graph
(``get_attr``), whatever the layer is called; the int8/int4 ``weight_only_linear`` of
quantize_weights keeps its own form: with ``weights=``, prefill_dtype takes
``QuantConfig(prefill="dequantized")``, whose float32 weights this pass converts (it
runs after quantize_weights). A model already in bfloat16 has nothing to convert: its
phase runs as it is, on an engine with bf16 kernels.

The bfloat16 copies are made once per weight and shared by the prefill, extend and
score graphs (half the float32 bytes, once).
"""

from __future__ import annotations

import weakref

import torch

from .manager import GraphPass, PassResult
from .quantize_weights import _constant
from .utils import attr, aten, constant_linears, derived_once, val

NAME = "bf16_matmuls"

# float32 weight -> its bfloat16 copy, shared by the prefill-like graphs (utils.derived_once)
_COPIES: "weakref.WeakValueDictionary[tuple, torch.Tensor]" = weakref.WeakValueDictionary()


def bf16_supported(device: torch.device) -> tuple[bool, str]:
    """Whether ``device`` multiplies bfloat16 matrices natively, and what was found."""
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return ok, f"CUDA device {'with' if ok else 'without'} bf16"
    if device.type == "cpu":
        found = [name for name, has in (("AMX", torch.cpu._is_amx_tile_supported()),
                                        ("AVX-512 BF16", torch.cpu._is_avx512_bf16_supported())) if has]
        if found:
            return True, "CPU with " + " and ".join(found)
        return False, "CPU without AVX-512 BF16 or AMX (bf16 products would be emulated, slower than fp32)"
    return False, f"{device.type} device (bf16 compute is only enabled on CPU and CUDA here)"


def has_bf16_matmuls(gm: torch.fx.GraphModule) -> bool:
    """Whether a linear layer of ``gm`` multiplies bfloat16 weights (this pass's, or a bf16 model's)."""
    return any(weight.dtype == torch.bfloat16 for _, _, _, weight, _ in constant_linears(gm))


def bf16_matmuls(gm: torch.fx.GraphModule, ctx) -> PassResult:
    if getattr(ctx, "matmul_dtype", None) is not torch.bfloat16:
        return PassResult(gm, 0, "matmuls keep the model's dtype (OptimizeConfig.prefill_dtype)")
    graph = gm.graph
    casts: dict[torch.fx.Node, torch.fx.Node] = {}  # activation -> its bf16 cast (q/k/v share one)
    copies: dict[str, torch.fx.Node] = {}  # weight or bias attribute -> the get_attr of its copy
    converted, already = 0, 0

    def copy_of(const: torch.fx.Node, user: torch.fx.Node) -> torch.fx.Node:
        if const.target not in copies:  # placed before its first user
            copy = derived_once(_COPIES, attr(gm, const.target), lambda w: w.to(torch.bfloat16))
            copies[const.target] = _constant(gm, user, "bf16_" + const.target.replace(".", "_"), copy)
        return copies[const.target]

    for node, x, w, weight, bias in constant_linears(gm):
        if weight.dtype == torch.bfloat16:
            already += 1
            continue
        if weight.dtype != torch.float32:
            continue
        if bias is not None and not (isinstance(bias, torch.fx.Node) and bias.op == "get_attr"):
            continue  # a computed bias: not a plain linear layer
        w16, b16 = (None if a is None else copy_of(a, node) for a in (w, bias))
        if x not in casts:  # before its first linear; the later ones follow it in graph order
            with graph.inserting_before(node):
                casts[x] = graph.call_function(aten._to_copy.default, (x,), {"dtype": torch.bfloat16})
        with graph.inserting_before(node):
            y16 = graph.call_function(aten.linear.default, (casts[x], w16, b16))
            y = graph.call_function(aten._to_copy.default, (y16,), {"dtype": val(node).dtype})
        node.replace_all_uses_with(y)
        graph.erase_node(node)
        converted += 1
    if not converted:
        detail = f"{already} linear layers already in bfloat16" if already else "no float32 linear layer"
        return PassResult(gm, 0, detail)
    return PassResult(gm, converted, f"{converted} linear layers compute in bfloat16 (fp32 accumulation)")


PASS = GraphPass(NAME, bf16_matmuls, __doc__)
