"""Canonical ``pdcompile::`` operators that the passes insert and every backend lowers.

``pdcompile::attention`` is the one attention the product knows about. It never takes a
mask tensor; which keys a query may see is described by positions instead:

* ``q_pos is None``: causal attention of a prompt that starts at position 0
  (prefill). Query ``i`` sees keys ``0..i``. Lowers to SDPA with ``is_causal=True``,
  whose tiled kernels skip the fully masked tiles.
* ``q_pos`` of shape ``[B]``: query ``i`` of row ``b`` sits at position
  ``q_pos[b] + i`` and sees keys ``0..q_pos[b] + i`` of its own row (decode, where
  ``Sq == 1``, and a pruned prefill that keeps one query per row).

``window > 0`` additionally hides keys more than ``window - 1`` positions behind the
query (sliding-window attention). ``k``/``v`` may have fewer heads than ``q``
(grouped-query attention); they are never repeated in memory.

Each backend lowers the op through :func:`attention_reference` (a plain aten
decomposition), so eager, inductor, ONNX and TensorRT all see the same math.
"""

from __future__ import annotations

import torch

__all__ = ["attention", "attention_reference", "paged_attention", "paged_attention_reference", "DECOMPOSITIONS",
           "weight_only_linear", "weight_only_linear_reference", "quantize_weight", "dequantize_weight"]


def _visible(q_pos: torch.Tensor, sq: int, sk: int, window: int) -> torch.Tensor:
    # [B, 1, Sq, Sk] bool: key j visible to query i of row b.
    qi = q_pos.view(-1, 1, 1, 1) + torch.arange(sq, device=q_pos.device).view(1, 1, sq, 1)
    kj = torch.arange(sk, device=q_pos.device).view(1, 1, 1, sk)
    keep = kj <= qi
    if window > 0:
        keep = keep & (qi - kj < window)
    return keep


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor | None,
    scale: float,
    window: int = 0,
) -> torch.Tensor:
    """The op's semantics in aten ops; also its decomposition for every backend.

    Grouped-query attention goes through SDPA's ``enable_gqa`` (query head h reads kv head
    h // (Hq / Hkv), HF's repeat_kv order), so kv heads are never copied.
    """
    gqa = q.shape[1] != k.shape[1]
    if q_pos is None and window == 0:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    if q_pos is None:
        q_pos = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    mask = _visible(q_pos, q.shape[2], k.shape[2], window)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


@torch.library.custom_op("pdcompile::attention", mutates_args=())
def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor | None,
    scale: float,
    window: int = 0,
) -> torch.Tensor:
    return attention_reference(q, k, v, q_pos, scale, window)


@attention.register_fake
def _(q, k, v, q_pos, scale, window=0):
    return q.new_empty(q.shape[:-1] + (v.shape[-1],))


def gather_blocks(pool: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
    """``pool[N, block_size, H, D]`` read through ``block_table[B, M]`` -> ``[B, H, M * block_size, D]``:
    each row's keys (or values) in position order, as contiguous-cache attention reads them."""
    b, m = block_table.shape
    gathered = pool[block_table]  # [B, M, block_size, H, D]
    return gathered.reshape(b, m * pool.shape[1], pool.shape[2], pool.shape[3]).transpose(1, 2)


def paged_attention_reference(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_table: torch.Tensor,
    q_pos: torch.Tensor | None,
    scale: float,
    window: int = 0,
) -> torch.Tensor:
    """``pdcompile::paged_attention`` in aten ops: gather the row's blocks, then :func:`attention_reference`."""
    return attention_reference(q, gather_blocks(k_pool, block_table), gather_blocks(v_pool, block_table),
                               q_pos, scale, window)


@torch.library.custom_op("pdcompile::paged_attention", mutates_args=())
def paged_attention(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_table: torch.Tensor,
    q_pos: torch.Tensor | None,
    scale: float,
    window: int = 0,
) -> torch.Tensor:
    """``pdcompile::attention`` whose keys and values live in a paged KV pool.

    ``k_pool``/``v_pool``: ``[num_blocks, block_size, Hkv, D]``; row b's position p lives in
    block ``block_table[b, p // block_size]`` at offset ``p % block_size``. Positions are
    as for :func:`attention` (``q_pos`` [B], decode and extend). Keys past a row's length
    (unused table entries point at scratch block 0) are hidden by the positions, never read
    as data. A backend with a native paged kernel reads the blocks in place; the reference
    gathers them.
    """
    return paged_attention_reference(q, k_pool, v_pool, block_table, q_pos, scale, window)


@paged_attention.register_fake
def _(q, k_pool, v_pool, block_table, q_pos, scale, window=0):
    return q.new_empty(q.shape[:-1] + (v_pool.shape[-1],))


# Decomposition table handed to inductor / run_decompositions / the ONNX exporter.
DECOMPOSITIONS = {torch.ops.pdcompile.attention.default: attention_reference,
                  torch.ops.pdcompile.paged_attention.default: paged_attention_reference}


def attention_grouped(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor | None,
    scale: float,
    window: int = 0,
) -> torch.Tensor:
    """The op in plain matmul/softmax, for exporters (ONNX) without a GQA attention.

    Query heads are split under their kv head (``[B, Hkv, rep, Sq, D]``; HF's head order
    is h = kv * rep + r) and k/v get a broadcast axis instead of being repeated, so a
    decode step never copies the cache. Only static axes are split or merged, which
    keeps the symbolic prompt length out of every reshape.
    """
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    rep = hq // hkv
    q5 = q.view(b, hkv, rep, sq, d)
    scores = torch.matmul(q5, k.unsqueeze(2).transpose(-1, -2)) * scale  # [B, Hkv, rep, Sq, Sk]
    start = q_pos.view(-1, 1, 1) if q_pos is not None else torch.zeros(1, 1, 1, dtype=torch.long, device=q.device)
    qi = start + torch.arange(sq, device=q.device).view(1, -1, 1)  # [B|1, Sq, 1] query positions
    kj = torch.arange(sk, device=q.device).view(1, 1, -1)
    keep = kj <= qi
    if window > 0:
        keep = keep & (qi - kj < window)
    scores = scores.masked_fill(~keep.view(keep.shape[0], 1, 1, sq, sk), float("-inf"))
    out = torch.matmul(torch.softmax(scores, dim=-1), v.unsqueeze(2))  # [B, Hkv, rep, Sq, Dv]
    return out.reshape(b, hq, sq, v.shape[-1])


def paged_attention_grouped(q, k_pool, v_pool, block_table, q_pos, scale, window=0):
    """:func:`paged_attention` for exporters without a GQA attention (see :func:`attention_grouped`).

    The gathered blocks take q's dtype: a 16-bit pool under float32 compute is converted
    block by block as read, not as a whole (passes/float32_compute.py)."""
    return attention_grouped(q, gather_blocks(k_pool, block_table).to(q.dtype),
                             gather_blocks(v_pool, block_table).to(q.dtype), q_pos, scale, window)


# ----------------------------------------------------------------------------- weight-only quantization
#
# ``pdcompile::weight_only_linear`` keeps its weight in ONNX Runtime's MatMulNBits layout, so
# the onnxruntime lowering hands the buffers over as they are and every backend reads the
# same bytes (K = in_features, N = out_features, G = group_size, n = K // G groups per row):
#
#   qweight      uint8 [N, n, G * bits // 8]  codes along K, 4-bit codes two a byte, low nibble first
#   scales       float [N * n]                one per group, the model's dtype
#   zero_points  uint8 [N * ceil(n * bits / 8)] per group, packed like the codes; None: symmetric,
#                the zero point is 2 ** (bits - 1) (8 or 128), as MatMulNBits assumes without one
#
#   w[o, g * G + j] = (code[o, g, j] - zero_point[o, g]) * scale[o, g]


def _pack4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 values < 16 [..., 2m] -> [..., m], element 2i in the low nibble of byte i."""
    pairs = codes.reshape(*codes.shape[:-1], -1, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4)


def _unpack4(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(*packed.shape[:-1], -1)


def _smaller_error(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, h: int) -> torch.Tensor:
    """Per group of ``w [N, n, G]``, whichever symmetric scale ``a`` or ``b [N, n]`` rounds it
    onto codes -h .. h-1 with the smaller squared error."""
    def error(scale):
        s = torch.where(scale == 0, 1.0, scale).unsqueeze(-1)
        return ((torch.round(w / s).clamp(-h, h - 1) * s - w) ** 2).sum(dim=-1)
    return torch.where(error(b) < error(a), b, a)


def quantize_weight(weight: torch.Tensor, bits: int, group_size: int, symmetric: bool):
    """``weight [N, K]`` -> ``(qweight, scales, zero_points or None)`` in the layout above.

    Symmetric: codes centred on 2 ** (bits - 1) (h below), and of two scales per group the one
    with the smaller squared error: max|w| / (h - 1), which maps the group onto codes
    1 .. 2h - 1, and w_e / -h with w_e the group's largest-magnitude weight, which maps w_e
    exactly onto code 0 and uses all 2h codes (llama.cpp's Q4_0/Q8_0 scale; the scale is
    negative when w_e is positive, which the layout allows) but clips the other side's
    extreme when it exceeds (h - 1) / h of |w_e|. Choosing per group cut SmolLM2's int4
    perplexity increase (lm_head in 4 bits too) from +49% to +28% (benchmarks/accuracy.py,
    BENCHMARKS.md 2026-12-07);
    a wider search over clipped scales by weight error alone made it worse (outlier weights
    matter more than their share of the squared error).
    Asymmetric: the group's [min, max] (widened to contain 0) over all 2 ** bits codes.
    An all-zero group gets scale 1 (its codes are the zero point, so it dequantizes to 0).
    """
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    n_out, k = weight.shape
    if k % group_size:
        raise ValueError(f"group_size {group_size} does not divide in_features {k}")
    w = weight.detach().to(torch.float32).reshape(n_out, k // group_size, group_size)
    qmax = 2**bits - 1
    if symmetric:
        h = 2 ** (bits - 1)
        zero = torch.full(w.shape[:2], h, dtype=torch.float32)
        extreme = torch.gather(w, -1, w.abs().argmax(dim=-1, keepdim=True)).squeeze(-1)
        scale = _smaller_error(w, extreme.abs() / (h - 1), extreme / -h, h)
    else:
        lo, hi = w.amin(dim=-1).clamp(max=0), w.amax(dim=-1).clamp(min=0)
        scale = (hi - lo) / qmax
        zero = torch.round(-lo / torch.where(scale == 0, 1.0, scale)).clamp(0, qmax)
    scale = torch.where(scale == 0, 1.0, scale)
    codes = (torch.round(w / scale.unsqueeze(-1)) + zero.unsqueeze(-1)).clamp(0, qmax).to(torch.uint8)
    qweight = _pack4(codes) if bits == 4 else codes
    scales = scale.to(weight.dtype).reshape(-1)
    zero_points = None
    if not symmetric:
        zp = zero.to(torch.uint8)
        if bits == 4:
            if zp.shape[1] % 2:  # MatMulNBits pads each row's zero points to whole bytes
                zp = torch.cat([zp, torch.full((n_out, 1), 8, dtype=torch.uint8)], dim=1)
            zp = _pack4(zp)
        zero_points = zp.reshape(-1)
    return qweight.contiguous(), scales.contiguous(), zero_points


def dequantize_weight(qweight, scales, zero_points, bits: int, group_size: int) -> torch.Tensor:
    """The ``[N, K]`` weight the layout above stands for, in the scales' dtype."""
    n_out, n_groups = qweight.shape[0], qweight.shape[1]
    codes = _unpack4(qweight) if bits == 4 else qweight  # [N, n, G]
    if zero_points is None:
        zero = torch.full((n_out, n_groups), 2 ** (bits - 1), dtype=torch.float32, device=qweight.device)
    else:
        zp = zero_points.reshape(n_out, -1)
        zero = (_unpack4(zp) if bits == 4 else zp)[:, :n_groups].to(torch.float32)
    scale = scales.reshape(n_out, n_groups).to(torch.float32)
    w = (codes.to(torch.float32) - zero.unsqueeze(-1)) * scale.unsqueeze(-1)
    return w.reshape(n_out, n_groups * group_size).to(scales.dtype)


def quantize_activations(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """x rounded to int8 per group of ``group_size`` along its last dim, returned dequantized:
    scale = max|x_group| / 127, code = round-half-even(x * 127 / max|x_group|).

    This is what ONNX Runtime's MatMulNBits does to its input at ``accuracy_level=4``
    (MLAS quantizes each row of A per weight block before its int8 dot products). Checked
    against onnxruntime 1.32 on AVX2 for 4/8 bits, symmetric and not, groups 32-128: the
    outputs agree to ~4e-6 (fp32 accumulation order), against ~5e-2 without this step.
    """
    shape = x.shape
    g = x.reshape(*shape[:-1], shape[-1] // group_size, group_size).to(torch.float32)  # 16-bit x: scale in fp32
    amax = g.abs().amax(dim=-1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    return (torch.round(g * inv) * (amax / 127.0)).reshape(shape).to(x.dtype)


def weight_only_linear_reference(x, qweight, scales, zero_points, bias, bits: int, group_size: int,
                                 accuracy_level: int = 0) -> torch.Tensor:
    """``pdcompile::weight_only_linear`` in aten ops: dequantize, then ``linear``.

    ``accuracy_level`` is ONNX Runtime's MatMulNBits compute type: 0 computes in x's dtype,
    4 quantizes x to int8 per group first (``quantize_activations``). Every backend computes
    the same function: onnxruntime in its int8 kernels, the others in these aten ops.
    """
    if accuracy_level == 4:
        x = quantize_activations(x, group_size)
    return torch.nn.functional.linear(x, dequantize_weight(qweight, scales, zero_points, bits, group_size), bias)


@torch.library.custom_op("pdcompile::weight_only_linear", mutates_args=())
def weight_only_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zero_points: torch.Tensor | None,
    bias: torch.Tensor | None,
    bits: int,
    group_size: int,
    accuracy_level: int = 0,
) -> torch.Tensor:
    """``linear(x, W, bias)`` with ``W`` stored group-wise in ``bits`` bits (layout above)."""
    return weight_only_linear_reference(x, qweight, scales, zero_points, bias, bits, group_size, accuracy_level)


@weight_only_linear.register_fake
def _(x, qweight, scales, zero_points, bias, bits, group_size, accuracy_level=0):
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


DECOMPOSITIONS[torch.ops.pdcompile.weight_only_linear.default] = weight_only_linear_reference
