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

REPORT_SHAPE = {"batch": 1, "prompt": 128, "capacity": 256}
PAGE = 16  # block size the example paged inputs use

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
        if target not in _VIEWS and isinstance(out, torch.Tensor):
            self.act_bytes += _nbytes(out)
        return out


def example_inputs(gm: torch.fx.GraphModule, phase: str, batch: int, prompt: int, capacity: int, device="cpu"):
    """Real (zero) inputs for ``gm`` at one concrete shape, following the phase contract."""
    inputs = []
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        val = node.meta["val"]
        if node.name == "input_ids":
            seq = 1 if phase == "decode" else prompt
            if phase == "extend":
                capacity = max(capacity, 2 * prompt)
            inputs.append(torch.zeros(batch, seq, dtype=val.dtype, device=device))
        elif node.name in ("last_idx", "pos", "start"):
            # extend: a prompt-long chunk after a prompt-long cached prefix
            v = prompt - 1 if node.name == "last_idx" else prompt
            inputs.append(torch.full((batch,), v, dtype=val.dtype, device=device))
        elif node.name == "block_table":  # paged: row b owns blocks 1 + b*M .. (block 0: scratch)
            per_row = -(-capacity // PAGE)
            inputs.append(1 + torch.arange(batch * per_row, device=device).view(batch, per_row))
        elif node.name == "slot_mapping":
            per_row = -(-capacity // PAGE)
            start = prompt if phase in ("decode", "extend") else 0
            width = 1 if phase == "decode" else prompt
            pos = start + torch.arange(width, device=device)
            slots = (1 + torch.arange(batch, device=device).view(-1, 1) * per_row) * PAGE + pos.view(1, -1)
            inputs.append(slots.view(batch) if phase == "decode" else slots)
        elif node.name.startswith("pool_"):  # paged: [num_blocks, block_size, H, D]
            blocks = 1 + batch * -(-capacity // PAGE)
            inputs.append(torch.zeros(blocks, int(val.shape[1]), int(val.shape[2]), int(val.shape[3]),
                                      dtype=val.dtype, device=device))
        else:  # a cache tensor [B, H, T, D]
            shape = (batch, int(val.shape[1]), capacity, int(val.shape[3]))
            inputs.append(torch.zeros(shape, dtype=val.dtype, device=device))
    return inputs


def estimate_cost(gm: torch.fx.GraphModule, phase: str, shape: dict | None = None) -> dict:
    shape = {**REPORT_SHAPE, **(shape or {})}
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    real = example_inputs(gm, phase, shape["batch"], shape["prompt"], shape["capacity"])
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
