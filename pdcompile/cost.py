"""Static cost estimate of a phase graph: FLOPs and bytes at a representative shape.

The graph is run on fake tensors (no data, no compute) at batch 1, a 128-token prompt
and a 256-slot cache (``REPORT_SHAPE``); matmuls and attention are counted from their
shapes, the rest of the FLOPs is negligible and ignored. Bytes are what an unfused
execution would move at least once: every weight read, the cache tensors attention
reads, and the outputs of non-view ops written. Good for comparing a graph before
and after a pass, not a runtime prediction.
"""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

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


def _nbytes(t) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def _attention_flops(q, k, causal: bool) -> int:
    b, h, sq, d = q.shape
    sk = k.shape[-2]
    flops = 4 * b * h * sq * sk * d  # QK^T and PV
    return flops // 2 if causal and sq == sk else flops


class _CostInterpreter(torch.fx.Interpreter):
    def __init__(self, gm, mode):
        super().__init__(gm)
        self.mode = mode
        self.flops = 0
        self.weight_bytes = 0
        self.kv_read_bytes = 0
        self.act_bytes = 0
        self._fake_params = {}

    def get_attr(self, target, args, kwargs):
        real = super().get_attr(target, args, kwargs)
        if isinstance(real, torch.Tensor) and id(real) not in self._fake_params:
            self._fake_params[id(real)] = self.mode.from_tensor(real)
            self.weight_bytes += _nbytes(real)
        return self._fake_params.get(id(real), real)

    def call_function(self, target, args, kwargs):
        out = super().call_function(target, args, kwargs)
        if target in _LINEAR:
            x, w = (args[1], args[2]) if target is _aten.addmm.default else (args[0], args[1])
            n_out = w.shape[0] if target is _aten.linear.default else w.shape[1]
            self.flops += 2 * (x.numel() // x.shape[-1]) * x.shape[-1] * n_out
        elif target in _MATMUL:
            a, b = args[0], args[1]
            self.flops += 2 * (a.numel() // a.shape[-1]) * a.shape[-1] * b.shape[-1]
        elif target in _SDPA:
            causal = bool(kwargs.get("is_causal", args[5] if len(args) > 5 else False))
            self.flops += _attention_flops(args[0], args[1], causal)
            self.kv_read_bytes += _nbytes(args[1]) + _nbytes(args[2])
        elif target is torch.ops.pdcompile.attention.default:
            self.flops += _attention_flops(args[0], args[1], causal=args[3] is None)
            self.kv_read_bytes += _nbytes(args[1]) + _nbytes(args[2])
        elif target is torch.ops.pdcompile.paged_attention.default:  # (q, k_pool, v_pool, block_table, ...)
            q, k_pool, v_pool, table = args[:4]
            rows = table.numel() * k_pool.shape[1]  # keys read: every table entry's block
            keys = q.new_empty(q.shape[0], k_pool.shape[2], rows // q.shape[0], k_pool.shape[3])
            self.flops += _attention_flops(q, keys, causal=False)
            self.kv_read_bytes += rows * k_pool[0, 0].numel() * k_pool.element_size() * 2
        if target not in _VIEWS and isinstance(out, torch.Tensor):
            self.act_bytes += _nbytes(out)
        return out


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
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    real = example_inputs(signature, shape["batch"], shape["prompt"], shape["capacity"])
    with mode:
        fake = [mode.from_tensor(t) for t in real]
        interp = _CostInterpreter(gm, mode)
        interp.run(*fake)
    return {
        "flops": interp.flops,
        "weight_bytes": interp.weight_bytes,
        "kv_read_bytes": interp.kv_read_bytes,
        "activation_bytes": interp.act_bytes,
        "bytes": interp.weight_bytes + interp.kv_read_bytes + interp.act_bytes,
    }
