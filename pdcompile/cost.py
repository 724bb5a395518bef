"""Static cost estimate of a phase graph: FLOPs and bytes at a representative shape.

Every node's symbolic shape (its ``meta["val"]``) is evaluated at batch 1, a 128-token
prompt and a 256-slot cache (``REPORT_SHAPE``); matmuls and attention are counted from
their shapes, the rest of the FLOPs is negligible and ignored. Bytes are what an unfused
execution would move at least once: every weight read, the cache tensors attention
reads, and the outputs of non-view ops written. Good for comparing a graph before
and after a pass, not a runtime prediction.
"""

from __future__ import annotations

import functools
import math

import sympy
import torch

from .phase import PHASES, PhaseSignature, Role

REPORT_SHAPE = {"batch": 1, "prompt": 128, "capacity": 256}

_aten = torch.ops.aten
_MATMUL = {_aten.mm.default, _aten.bmm.default, _aten.matmul.default}
_LINEAR = {_aten.linear.default, _aten.addmm.default}
_SDPA = {_aten.scaled_dot_product_attention.default}
_VIEWS = {
    _aten.view.default, _aten.reshape.default, _aten.unsqueeze.default, _aten.squeeze.dim,
    _aten.transpose.int, _aten.permute.default, _aten.expand.default, _aten.slice.Tensor,
    _aten.select.int, _aten.alias.default, _aten._unsafe_view.default, _aten.t.default,
}


def _attention_flops(q: list[int], sk: int, causal: bool) -> int:
    b, h, sq, d = q
    flops = 4 * b * h * sq * sk * d  # QK^T and PV
    return flops // 2 if causal and sq == sk else flops


class _Sizes:
    """Concrete sizes of a graph's (symbolic) values at one input shape.

    Every node's ``meta["val"]`` holds the capture's symbolic shapes, whose symbols are
    the placeholders' dynamic dims; binding those to the example inputs' sizes gives every
    shape at the report shape by substitution, with no fake-tensor run (which costs
    ~1 ms per node, seconds on a 30-layer graph). Few distinct expressions occur, so
    each is evaluated once.
    """

    def __init__(self, gm: torch.fx.GraphModule, inputs: list[torch.Tensor]):
        self.bound: dict = {}
        self._memo: dict = {}
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        for node, real in zip(placeholders, inputs, strict=True):
            for dim, size in zip(_val(node).shape, real.shape, strict=True):
                expr = dim.node.expr if isinstance(dim, torch.SymInt) else None
                if isinstance(expr, sympy.Symbol):
                    self.bound[expr] = sympy.Integer(size)

    def dim(self, d) -> int:
        if not isinstance(d, torch.SymInt):
            return int(d)
        expr = d.node.expr
        if expr not in self._memo:
            value = expr.xreplace(self.bound)
            if not value.is_number:
                raise ValueError(f"cost estimate: size {expr} depends on {value.free_symbols}, which no input sets")
            self._memo[expr] = int(value)
        return self._memo[expr]

    def shape(self, node) -> list[int]:
        return [self.dim(d) for d in _val(node).shape]

    def nbytes(self, node) -> int:
        return math.prod(self.shape(node)) * _val(node).element_size()


def _val(node: torch.fx.Node):
    if "val" not in node.meta:
        raise ValueError(f"cost estimate: node {node.name} has no meta['val'] (run the pass manager's refresh_meta)")
    return node.meta["val"]


def example_inputs(signature: PhaseSignature, batch: int, prompt: int, capacity: int, device="cpu"):
    """Real (zero) inputs of a phase at one concrete shape, by role.

    Decode and extend graphs are fed as a row that already holds ``prompt`` tokens (extend:
    a prompt-long chunk after a prompt-long cached prefix). Paged inputs give row b the
    blocks ``1 + b*M .. (b+1)*M`` (block 0 is scratch).
    """
    phase = signature.phase
    query = 1 if PHASES[phase].query == 1 else prompt
    if phase == "extend":
        capacity = max(capacity, 2 * prompt)
    page = signature.block_size or 1
    per_row = -(-capacity // page)
    start = prompt if signature.has(Role.POSITIONS) else 0
    inputs = []
    for spec in signature.inputs:
        if spec.role is Role.TOKENS:
            t = torch.zeros(batch, query, dtype=spec.dtype, device=device)
        elif spec.role is Role.LAST_IDX:
            t = torch.full((batch,), query - 1, dtype=spec.dtype, device=device)
        elif spec.role is Role.POSITIONS:
            t = torch.full((batch,), start, dtype=spec.dtype, device=device)
        elif spec.role is Role.BLOCK_TABLE:
            t = 1 + torch.arange(batch * per_row, device=device).view(batch, per_row)
        elif spec.role is Role.SLOT_MAPPING:
            pos = start + torch.arange(query, device=device)
            t = (1 + torch.arange(batch, device=device).view(-1, 1) * per_row) * page + pos.view(1, -1)
            t = t.view(batch) if len(spec.shape) == 1 else t
        elif spec.role is Role.POOL:  # [num_blocks, block_size, H, D]
            t = torch.zeros(1 + batch * per_row, *spec.shape[1:], dtype=spec.dtype, device=device)
        else:  # a contiguous cache [B, H, T, D]
            t = torch.zeros(batch, spec.shape[1], capacity, spec.shape[3], dtype=spec.dtype, device=device)
        inputs.append(t)
    return inputs


def estimate_cost(gm: torch.fx.GraphModule, signature: PhaseSignature, shape: dict | None = None) -> dict:
    shape = {**REPORT_SHAPE, **(shape or {})}
    sizes = _Sizes(gm, example_inputs(signature, shape["batch"], shape["prompt"], shape["capacity"]))
    flops = weight_bytes = kv_read_bytes = act_bytes = 0
    weights = set()  # ids of the tensors counted: a weight read by several nodes is read once
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            attr = functools.reduce(getattr, node.target.split("."), gm)
            if isinstance(attr, torch.Tensor) and id(attr) not in weights:
                weights.add(id(attr))
                weight_bytes += attr.numel() * attr.element_size()
            continue
        if node.op != "call_function":
            continue
        target, args, kwargs = node.target, node.args, node.kwargs
        if target in _LINEAR:
            x, w = (args[1], args[2]) if target is _aten.addmm.default else (args[0], args[1])
            xs, ws = sizes.shape(x), sizes.shape(w)
            n_out = ws[0] if target is _aten.linear.default else ws[1]
            flops += 2 * math.prod(xs) * n_out
        elif target in _MATMUL:
            a, b = sizes.shape(args[0]), sizes.shape(args[1])
            flops += 2 * math.prod(a) * b[-1]
        elif target in _SDPA:
            causal = bool(kwargs.get("is_causal", args[5] if len(args) > 5 else False))
            flops += _attention_flops(sizes.shape(args[0]), sizes.shape(args[1])[-2], causal)
            kv_read_bytes += sizes.nbytes(args[1]) + sizes.nbytes(args[2])
        elif target is torch.ops.pdcompile.attention.default:
            flops += _attention_flops(sizes.shape(args[0]), sizes.shape(args[1])[-2], causal=args[3] is None)
            kv_read_bytes += sizes.nbytes(args[1]) + sizes.nbytes(args[2])
        elif target is torch.ops.pdcompile.paged_attention.default:  # (q, k_pool, v_pool, block_table, ...)
            q, pool = sizes.shape(args[0]), sizes.shape(args[1])
            rows = math.prod(sizes.shape(args[3])) * pool[1]  # keys read: every table entry's block
            flops += _attention_flops(q, rows // q[0], causal=False)
            kv_read_bytes += rows * pool[2] * pool[3] * _val(args[1]).element_size() * 2
        if target not in _VIEWS and isinstance(node.meta.get("val"), torch.Tensor):
            act_bytes += sizes.nbytes(node)
    return {
        "flops": flops,
        "weight_bytes": weight_bytes,
        "kv_read_bytes": kv_read_bytes,
        "activation_bytes": act_bytes,
        "bytes": weight_bytes + kv_read_bytes + act_bytes,
    }
