"""Cached attention -> ONNX Runtime's ``com.microsoft::GroupQueryAttention`` (onnxruntime backend).

Runs on a contiguous-cache phase graph after :func:`functionalize_cache_writes`, before the
re-export. Before (decode; rotary as HF writes it)::

    cos = cos(cat([pos[:, None, None].float() * inv_freq] * 2, -1))       # [B, 1, D], sin alike
    q = q * cos[:, None] + cat([-q[..., D/2:], q[..., :D/2]], -1) * sin[:, None]   # k alike
    present_k = index_put(caches_k, [rows, heads, pos], k[:, :, 0])       # v alike
    out = pdcompile.attention(q, present_k, present_v, pos, scale, window)
    return logits, present_k, present_v, ...

After::

    out, present_k, present_v = ort_group_query_attention(
        q_pre_rotary, k_pre_rotary, v, caches_k, caches_v, pos, scale, window, cos_cache, sin_cache)

which the exporter writes as one ``GroupQueryAttention`` node (``do_rotary=1`` with
``[capacity, D/2]`` cos/sin tables when the rotary matched, plain otherwise). The runtime
binds ``present_k`` to the buffer of ``caches_k`` (OrtPhase); GQA, seeing past and present
share a buffer, writes the new k/v in place at ``seqlens_k``: one kernel instead of the
ScatterNDs, the grouped matmul/softmax and ~20 rotary kernels per layer.

Prefill (``attention(q, k, v, None, ...)`` over the prompt's own k/v, which a separate
``index_put`` writes at positions 0..S-1) becomes the same op with ``pos = 0``; its rotary
stays in the graph (the tables are built from the decode graph's positions input only).

Declines (the attention stays decomposed): a non-float32 graph or a non-CPU device (the
op's CPU kernel is float32 only; the CUDA one has other constraints, not verified here);
any other query/write layout (the pruned last layer of a prefill, extend, pools of the
paged cache: GQA reads a contiguous cache and ONNX Runtime's PagedAttention has no CPU
kernel; those go to ONNX's ``Attention`` instead, :func:`paged_attention_onnx`); a cache
read by anything else; different q/k/v head sizes. The rotary is folded in only when both
q and k are rotated by exactly HF's rotate-half pattern over the whole head and cos/sin are
an elementwise function of ``pos`` (checked by op, then evaluated at every position
0..capacity-1 to build the tables, whose two halves must be equal); otherwise GQA gets the
graph's rotated q/k. Checked numerically against ONNX Runtime 1.32's CPU kernel:
``local_window_size = window`` (keys visible to a query), prompt and decode, in-place buffer.
"""

from __future__ import annotations

import logging
import operator

import torch

from ..ops import attention_reference
from ..passes.utils import ATTENTION, aten, val
from ..phase import PassContext, Role

logger = logging.getLogger(__name__)


def _rotate_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., h:], x[..., :h]], -1) * sin


def _rotary_at(x, positions, cos_cache, sin_cache):
    """``x [B, H, S, D]`` rotated at ``positions [B, S]`` with ``[capacity, D/2]`` cos/sin tables."""
    cos = torch.cat([cos_cache, cos_cache], -1)[positions].unsqueeze(1)  # [B, 1, S, D]
    sin = torch.cat([sin_cache, sin_cache], -1)[positions].unsqueeze(1)
    return _rotate_half(x, cos, sin)


def group_query_attention_reference(q, k, v, past_k, past_v, pos, scale: float, window: int,
                                    cos_cache=None, sin_cache=None):
    """The op's semantics: q/k/v ``[B, H, S, D]`` of new tokens at positions ``pos[b] + i``
    (rotated first when the tables are given, ``[capacity, D/2]``), written into copies of the
    ``[B, Hkv, capacity, D]`` caches, then :func:`attention_reference` over them."""
    b, _, s, _ = q.shape
    positions = pos.view(-1, 1) + torch.arange(s, device=q.device).view(1, -1)  # [B, S]
    if cos_cache is not None:
        q, k = _rotary_at(q, positions, cos_cache, sin_cache), _rotary_at(k, positions, cos_cache, sin_cache)
    rows = torch.arange(b, device=q.device).view(-1, 1)
    present_k, present_v = past_k.clone(), past_v.clone()
    present_k.transpose(1, 2)[rows, positions] = k.transpose(1, 2)  # [B, S, H, D] at [b, pos]
    present_v.transpose(1, 2)[rows, positions] = v.transpose(1, 2)
    return attention_reference(q, present_k, present_v, pos, scale, window), present_k, present_v


@torch.library.custom_op("pdcompile::ort_group_query_attention", mutates_args=())
def ort_group_query_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    past_k: torch.Tensor,
    past_v: torch.Tensor,
    pos: torch.Tensor,
    scale: float,
    window: int,
    cos_cache: torch.Tensor | None,
    sin_cache: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return group_query_attention_reference(q, k, v, past_k, past_v, pos, scale, window, cos_cache, sin_cache)


@ort_group_query_attention.register_fake
def _(q, k, v, past_k, past_v, pos, scale, window, cos_cache, sin_cache):
    return q.new_empty(q.shape), past_k.new_empty(past_k.shape), past_v.new_empty(past_v.shape)


GQA = torch.ops.pdcompile.ort_group_query_attention.default


@torch.library.custom_op("pdcompile::ort_rotary_embedding", mutates_args=())
def ort_rotary_embedding(x: torch.Tensor, pos: torch.Tensor, cos_cache: torch.Tensor,
                         sin_cache: torch.Tensor) -> torch.Tensor:
    """HF's rotate-half rotary of one new token per row, ``x [B, H, 1, D]`` at ``pos [B]``,
    with ``[capacity, D/2]`` cos/sin tables (ONNX's ``RotaryEmbedding``, opset 23)."""
    return _rotary_at(x, pos.view(-1, 1), cos_cache, sin_cache)


@ort_rotary_embedding.register_fake
def _(x, pos, cos_cache, sin_cache):
    return x.new_empty(x.shape)


ROTARY = torch.ops.pdcompile.ort_rotary_embedding.default

# Ops a rotary's cos/sin may be computed with from the positions: each output row depends
# on the same row of pos only, so evaluating them at pos = 0..capacity-1 gives the table.
_ROTARY_OPS = {aten.unsqueeze.default, aten.to.dtype, aten._to_copy.default, aten.mul.Tensor, aten.mul.Scalar,
               aten.cat.default, aten.cos.default, aten.sin.default, aten.view.default, aten.reshape.default,
               aten.transpose.int, aten.expand.default, aten.clone.default, aten.alias.default}


def lower_group_query_attention(gm: torch.fx.GraphModule, ctx: PassContext) -> int:
    """Rewrite ``gm`` in place as described above; returns the number of attentions lowered."""
    if ctx.device.type != "cpu" or ctx.phase not in ("prefill", "decode"):
        return 0
    graph = gm.graph
    nodes = ctx.signature.nodes(gm)
    caches = set(nodes[Role.CACHE])
    pos = nodes[Role.POSITIONS][0] if nodes[Role.POSITIONS] else None
    if not caches:
        return 0
    capacity = max(ctx.max_seq_len, 3)  # the cache's largest capacity (export_dims): every position a row reaches
    tables: dict = {}  # cos node -> (cos_cache, sin_cache) get_attr nodes, or None
    start = None  # prefill: the prompt starts at position 0 in every row
    done = 0
    for node in list(graph.nodes):
        if node.target is not ATTENTION:
            continue
        q, k, v, q_pos, scale, window = (list(node.args) + [0])[:6]
        if ctx.phase == "decode":
            writes = [_decode_write(w, pos, caches, node) for w in (k, v)] if q_pos is pos else [None]
        else:
            writes = [_prompt_write(x, caches, q) for x in (k, v)] if q_pos is None else [None]
        if None in writes or val(q).dtype != torch.float32:
            continue
        (k_cache, k_new, k_present), (v_cache, v_new, v_present) = writes
        if val(k_cache).dtype != torch.float32 or val(k_new).shape[-1] != val(v_new).shape[-1] \
                or val(k_new).shape[-1] != val(q).shape[-1] or val(q).shape[1] % val(k_new).shape[1]:
            continue
        # the tables are built from the decode graph's positions input; a prompt keeps its own rotary
        rot = _rotary(q, k_new, pos, gm, capacity, tables) if ctx.phase == "decode" else None
        with graph.inserting_before(node):
            if ctx.phase == "decode":
                first = pos
            else:
                if start is None:
                    start = graph.call_function(aten.zeros_like.default, (nodes[Role.LAST_IDX][0],))
                first = start
            cos, sin = (None, None) if rot is None else rot[2]
            args = (q if rot is None else rot[0], k_new if rot is None else rot[1], v_new, k_cache, v_cache, first,
                    scale, window, cos, sin)
            gqa = graph.call_function(GQA, args)
            outs = [graph.call_function(operator.getitem, (gqa, i)) for i in range(3)]
        for new, old in zip(outs, (node, k_present, v_present)):
            old.replace_all_uses_with(new)
        for old in (node, k_present, v_present):
            graph.erase_node(old)
        done += 1
    if done:
        graph.eliminate_dead_code()
        gm.recompile()
        logger.info("%s: %d attention(s) -> GroupQueryAttention (%s)", ctx.phase, done,
                    "rotary inside" if any(tables.values()) else "rotary outside")
    return done


def lower_decode_rotary(gm: torch.fx.GraphModule, ctx: PassContext) -> int:
    """Each rotary of a float32 decode graph on CPU that still is HF's rotate-half pattern
    (the paged graph's: GroupQueryAttention took the contiguous graph's) -> ``ort_rotary_embedding``,
    which the exporter writes as one ONNX ``RotaryEmbedding`` node (opset 23) instead of ~10
    Mul/Neg/Slice/Concat/Add kernels. Same checks as GQA's rotary: the pattern by op, cos/sin
    an elementwise function of the positions, tables evaluated at 0..capacity-1 with equal
    halves; anything else stays as it is. Returns the number of rotaries lowered."""
    if ctx.device.type != "cpu" or ctx.phase != "decode":
        return 0
    positions = ctx.signature.nodes(gm)[Role.POSITIONS]
    if not positions:
        return 0
    pos = positions[0]
    capacity = max(ctx.max_seq_len, 3)
    tables: dict = {}
    done = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not aten.add.Tensor:
            continue
        rot = _rotate_half_of(node)
        if rot is None or val(node).dtype != torch.float32 or val(node).dim() != 4 or val(node).shape[2] != 1:
            continue
        x0, cos, sin = rot
        if cos not in tables:
            tables[cos] = _tables(gm, cos, sin, pos, capacity, int(val(x0).shape[-1]))
        if tables[cos] is None:
            continue
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(ROTARY, (x0, pos, *tables[cos]))
        new.meta["val"] = node.meta.get("val")
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        done += 1
    if done:
        gm.graph.eliminate_dead_code()
        gm.recompile()
        logger.info("%s: %d rotary pattern(s) -> RotaryEmbedding", ctx.phase, done)
    return done


def _prompt_write(x, caches, q):
    """The prompt's k (or v) ``x [B, H, S, D]``, read by the attention and written whole into a cache at
    ``[arange(B)[:, None, None], arange(H)[None, :, None], arange(S)[None, None, :]]`` (positions
    0..S-1) by its only other reader -> (cache, x, the write), or None."""
    writes = [u for u in x.users if u.target is aten.index_put.default and u.args[2] is x]
    if len(writes) != 1 or len(x.users) != 2:
        return None
    present = writes[0]
    cache, indices, _ = present.args
    shape_reads = {u for u in cache.users if u.target is aten.sym_size.int}
    if cache not in caches or len(indices) != 3 or set(cache.users) - shape_reads != {present} \
            or set(present.users) != {present.graph.output_node()}:
        return None
    rows, heads, slots = indices
    if not (_view(rows, [-1, 1, 1]) and _view(heads, [1, -1, 1]) and _view(slots, [1, 1, -1])):
        return None
    ranges = [i.args[0] for i in indices]
    if any(r.target is not aten.arange.default or len(r.args) != 1 for r in ranges):
        return None
    batch, head_count, length = (r.args[0] for r in ranges)
    if not (isinstance(batch, torch.fx.Node) and batch.target is aten.sym_size.int and batch.args == (cache, 0)):
        return None
    if head_count != int(val(cache).shape[1]) or val(x).shape[1] != val(cache).shape[1]:
        return None
    # positions 0..S-1 of a prompt as long as the queries'
    if not (isinstance(length, torch.fx.Node) and length.target is aten.sym_size.int and length.args[1] == 1
            and val(x).shape[2] == val(q).shape[2] == val(length.args[0]).shape[1]):
        return None
    return cache, x, present


def _decode_write(present, pos, caches, attention):
    """``index_put(cache, [arange(B)[:, None], arange(H)[None, :], pos[:, None]], x[:, :, 0])`` (one token
    per row, every head, at ``pos``; as functionalize_cache_writes writes it) -> (cache, x [B, H, 1, D]),
    or None. Only the attention (and the graph's output) may read the written cache."""
    if not isinstance(present, torch.fx.Node) or present.target is not aten.index_put.default:
        return None
    cache, indices, values = present.args
    shape_reads = {u for u in cache.users if u.target is aten.sym_size.int}
    if cache not in caches or len(indices) != 3 or set(cache.users) - shape_reads != {present} \
            or set(present.users) - {attention, attention.graph.output_node()}:
        return None
    rows, heads, slots = indices
    if not (_view(rows, [-1, 1]) and _view(heads, [1, -1]) and _view(slots, [-1, 1]) and slots.args[0] is pos):
        return None
    batch, head_range = rows.args[0], heads.args[0]
    if batch.target is not aten.arange.default or head_range.target is not aten.arange.default:
        return None
    size = batch.args[0]
    if len(batch.args) != 1 or not (isinstance(size, torch.fx.Node) and size.target is aten.sym_size.int
                                    and size.args[1] == 0 and val(size.args[0]) is not None
                                    and val(size.args[0]).shape[0] == val(pos).shape[0]):
        return None
    if head_range.args != (int(val(cache).shape[1]),):
        return None
    # values: the whole [B, H, D] token of a [B, H, 1, D] tensor
    if values.target is not aten.select.int or tuple(values.args[1:]) != (2, 0) or val(values.args[0]).shape[2] != 1:
        return None
    return cache, values.args[0], present


def _view(node, shape) -> bool:
    return isinstance(node, torch.fx.Node) and node.target in (aten.view.default, aten.reshape.default) \
        and list(node.args[1]) == shape


def _rotary(q, k, pos, gm, capacity, tables):
    """(q, k before the rotary, (cos_cache, sin_cache) get_attr nodes) when both are rotated
    by HF's rotate-half with cos/sin computed from ``pos`` alone; None otherwise."""
    rq, rk = _rotate_half_of(q), _rotate_half_of(k)
    if rq is None or rk is None or rq[1:] != rk[1:]:
        return None
    cos, sin = rq[1], rq[2]
    if cos not in tables:
        tables[cos] = _tables(gm, cos, sin, pos, capacity, int(val(q).shape[-1]))
    if tables[cos] is None:
        return None
    return rq[0], rk[0], tables[cos]


def _rotate_half_of(x):
    """``add(mul(x0, cos4), mul(cat([neg(x0[..., h:]), x0[..., :h]]), sin4))`` -> (x0, cos, sin) with
    ``cos4 = unsqueeze(cos, 1)``, or None."""
    if x.target is not aten.add.Tensor or len(x.users) != 1:
        return None
    a, b = x.args
    if a.target is not aten.mul.Tensor or b.target is not aten.mul.Tensor:
        return None
    x0, cos4 = a.args
    cat, sin4 = b.args
    if cat.target is not aten.cat.default or cat.args[1] not in (-1, 3) or len(cat.args[0]) != 2:
        return None
    neg, lo = cat.args[0]
    if neg.target is not aten.neg.default:
        return None
    hi = neg.args[0]
    d = int(val(x0).shape[-1])
    h = d // 2
    if not (_is_slice(hi, x0, h, d) and _is_slice(lo, x0, 0, h)) or d % 2:
        return None
    if any(u.target is not aten.unsqueeze.default or u.args[1] != 1 for u in (cos4, sin4)):
        return None
    cos, sin = cos4.args[0], sin4.args[0]
    if cos.target is not aten.cos.default or sin.target is not aten.sin.default:
        return None
    if val(cos).dim() != 3 or val(cos).shape[1] != 1 or val(cos).shape[2] != d:
        return None
    return x0, cos, sin


def _is_slice(node, src, start, end) -> bool:
    if node.target is not aten.slice.Tensor or node.args[0] is not src or node.args[1] not in (3, -1):
        return False
    s, e = (list(node.args[2:]) + [0, None])[:2]
    return s == start and (e == end or (e is not None and e >= 2**62 and end == int(val(src).shape[-1])))


def _tables(gm, cos, sin, pos, capacity, d):
    """The ``[capacity, d/2]`` cos and sin tables as get_attr nodes, or None when cos/sin are not
    an elementwise function of ``pos`` (and constants) or their halves differ."""
    sub = torch.fx.Graph()
    env = {}
    order = []
    stack = [cos, sin]
    seen = set()
    while stack:  # the nodes cos and sin depend on
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        order.append(n)
        for a in n.all_input_nodes:
            stack.append(a)
    for n in order:
        if n.op == "placeholder" and n is not pos:
            return None
        if n.op == "call_function" and n.target not in _ROTARY_OPS:
            return None
        if n.op not in ("placeholder", "call_function", "get_attr"):
            return None
    p = sub.placeholder("pos")
    env[pos] = p
    for n in gm.graph.nodes:  # in graph order
        if n in seen and n is not pos:
            env[n] = sub.node_copy(n, lambda a: env[a])
    sub.output((env[cos], env[sin]))
    fn = torch.fx.GraphModule(gm, sub)
    with torch.no_grad():
        c, s = fn(torch.arange(capacity, device=val(pos).device))
    if c.shape != (capacity, 1, d) or c.dtype != torch.float32:
        return None
    c, s = c[:, 0], s[:, 0]
    h = d // 2
    if not (torch.equal(c[:, :h], c[:, h:]) and torch.equal(s[:, :h], s[:, h:])):
        return None
    nodes = []
    for name, t in (("cos", c[:, :h]), ("sin", s[:, :h])):
        attr = f"_gqa_{name}_cache_{len([k for k in gm._buffers if k.startswith('_gqa_')])}"
        gm.register_buffer(attr, t.contiguous().clone())
        with gm.graph.inserting_before(cos):
            nodes.append(gm.graph.get_attr(attr))
    return tuple(nodes)


# ----------------------------------------------------------------------------- ONNX translation

def group_query_attention_onnx(q, k, v, past_k, past_v, pos, scale: float, window: int,
                               cos_cache=None, sin_cache=None):
    """The op as ``com.microsoft::GroupQueryAttention`` (traced by the exporter).

    GQA takes q/k/v as ``[B, S, H*D]`` and ``seqlens_k`` = each row's key count - 1 (int32),
    ``total_sequence_length`` its maximum + 1; ``local_window_size`` is the number of keys a
    query sees (measured on ONNX Runtime 1.32: ``window``, not ``window - 1``).
    """
    from onnxscript import opset18 as op

    hq, hkv, d = q.shape[1], k.shape[1], q.shape[3]
    flat = op.Constant(value_ints=[0, 0, -1])

    def bsh(x):
        return op.Reshape(op.Transpose(x, perm=[0, 2, 1, 3]), flat)

    last = op.Add(pos, op.Sub(op.Shape(q, start=2, end=3), op.Constant(value_int=1)))  # [B] last new position
    seqlens = op.Cast(last, to=6)  # int32
    total = op.Cast(op.Add(op.ReduceMax(last, keepdims=0), op.Constant(value_int=1)), to=6)
    rotary = cos_cache is not None
    inputs = [bsh(q), bsh(k), bsh(v), past_k, past_v, seqlens, total] + ([cos_cache, sin_cache] if rotary else [])
    out, present_k, present_v = _gqa_op()(*inputs, num_heads=hq, kv_num_heads=hkv, scale=scale,
                                          local_window_size=window if window > 0 else -1, do_rotary=int(rotary),
                                          rotary_interleaved=0, _num_outputs=3)
    shape = op.Constant(value_ints=[0, 0, hq, d])
    return op.Transpose(op.Reshape(out, shape), perm=[0, 2, 1, 3]), present_k, present_v


def _gqa_op():
    """GroupQueryAttention as an onnxscript op: the part of onnxruntime's schema
    (contrib_defs/bert_defs.cc) this lowering uses (onnx has no schemas for contrib ops)."""
    import onnxscript
    from onnx.defs import OpSchema

    param, optional = OpSchema.FormalParameter, OpSchema.FormalParameterOption.Optional
    ints = [OpSchema.Attribute(a, OpSchema.AttrType.INT, "") for a in
            ("num_heads", "kv_num_heads", "local_window_size", "do_rotary", "rotary_interleaved")]
    schema = OpSchema(
        "GroupQueryAttention", "com.microsoft", 1,
        inputs=[param("query", "T"), param("key", "T", param_option=optional),
                param("value", "T", param_option=optional), param("past_key", "T", param_option=optional),
                param("past_value", "T", param_option=optional), param("seqlens_k", "M"),
                param("total_sequence_length", "M"), param("cos_cache", "T", param_option=optional),
                param("sin_cache", "T", param_option=optional)],
        outputs=[param("output", "T"), param("present_key", "T"), param("present_value", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], ""),
                          ("M", ["tensor(int32)"], "")],
        attributes=ints + [OpSchema.Attribute("scale", OpSchema.AttrType.FLOAT, "")],
    )
    return onnxscript.values.Op(onnxscript.values.Opset("com.microsoft", 1), "GroupQueryAttention", schema)


def attention_onnx(q, k, v, q_pos, scale: float, window: int = 0):
    """``pdcompile::attention`` in ONNX ops, as :func:`pdcompile.ops.attention_grouped` writes it.

    Query heads split under their kv head (``[B, Hkv, rep, Sq, D]``), k/v with a broadcast
    axis (never repeated), a boolean causal (and window) mask from the positions, Softmax.
    Written here so that a graph whose only non-ATen nodes are this op translates without
    a re-export (program.program_from_graph: 3.8 s of R1's cold optimize()). Unlike the traced
    ``attention_grouped`` each layer builds its own mask from its q's shape (~9 small nodes
    a layer); measured on R1 and SmolLM2 prefill (128 tokens, one process, interleaved):
    the same logits bit for bit, R1 +0.4 to +1.6% (~0.3 ms, the extra nodes), SmolLM2 -0.9%
    (BENCHMARKS.md, 2026-12-08). Where GroupQueryAttention applies it replaced this op
    before (lower_group_query_attention).
    """
    from onnxscript import opset18 as op

    hq, d = q.shape[1], q.shape[3]
    hkv, dv = k.shape[1], v.shape[3]
    q5 = op.Reshape(q, op.Constant(value_ints=[0, hkv, hq // hkv, -1, d]))
    kt = op.Transpose(op.Unsqueeze(k, op.Constant(value_ints=[2])), perm=[0, 1, 2, 4, 3])  # -> FusedMatMul(transB)
    scores = op.Mul(op.MatMul(q5, kt), op.CastLike(op.Constant(value_float=scale), q))
    zero, one = op.Constant(value_int=0), op.Constant(value_int=1)
    sq = op.Range(zero, op.Squeeze(op.Shape(q, start=2, end=3)), one)
    sk = op.Range(zero, op.Squeeze(op.Shape(k, start=2, end=3)), one)
    start = op.Constant(value_ints=[0]) if q_pos is None else q_pos
    qi = op.Add(op.Unsqueeze(start, op.Constant(value_ints=[1, 2])), op.Unsqueeze(sq, op.Constant(value_ints=[0, 2])))
    kj = op.Unsqueeze(sk, op.Constant(value_ints=[0, 1]))  # [1, 1, Sk]
    keep = op.LessOrEqual(kj, qi)  # [B|1, Sq, Sk]
    if window > 0:
        keep = op.And(keep, op.Less(op.Sub(qi, kj), op.Constant(value_int=window)))
    keep = op.Unsqueeze(keep, op.Constant(value_ints=[1, 2]))  # [B|1, 1, 1, Sq, Sk]
    scores = op.Where(keep, scores, op.CastLike(op.Constant(value_float=float("-inf")), q))
    out = op.MatMul(op.Softmax(scores, axis=-1), op.Unsqueeze(v, op.Constant(value_ints=[2])))
    return op.Reshape(out, op.Constant(value_ints=[0, hq, -1, dv]))


def paged_attention_onnx(q, k_pool, v_pool, block_table, q_pos, scale: float, window: int = 0):
    """``pdcompile::paged_attention`` as ONNX ``Attention`` (opset 23) over the gathered blocks.

    ONNX Runtime has no CPU kernel that reads a paged cache in place (its ``PagedAttention``
    contrib op is CUDA only) and ``GroupQueryAttention`` reads a contiguous ``[B, Hkv, S, D]``
    cache. The pools' ``[num_blocks, block_size, Hkv, D]`` layout gathers to ``[B, M*bs,
    Hkv*D]`` by a Reshape alone, which is the 3-D key/value form of the standard ``Attention``
    op (grouped heads via ``kv_num_heads``, HF's head order). So one step costs a Gather per
    pool and one attention kernel, where the decomposed form also transposed the gathered
    cache and ran ~10 kernels per layer. Keys past a row's length (scratch block 0) and, for
    a sliding layer, keys older than the window are hidden by a boolean mask built from the
    positions. Measured on ONNX Runtime 1.32's CPU kernel: SmolLM2 shapes, 30 layers, 192
    cached tokens, 1.6 ms a step against 0.8 ms for contiguous GroupQueryAttention in place.
    """
    from onnxscript import opset23 as op

    hq, hkv, dv = q.shape[1], k_pool.shape[2], v_pool.shape[3]
    flat = op.Constant(value_ints=[0, 0, -1])

    def gathered(pool):  # [B, M, bs, Hkv, D] -> [B, M*bs, Hkv*D], in q's dtype
        rows = op.Constant(value_ints=[0, -1, pool.shape[2] * pool.shape[3]])
        blocks = op.Reshape(op.Gather(pool, block_table, axis=0), rows)
        # a 16-bit pool under float32 compute: convert what was gathered, not the pool
        return blocks if pool.dtype == q.dtype else op.CastLike(blocks, q)

    keys = op.Mul(op.Shape(block_table, start=1, end=2), op.Constant(value_ints=[k_pool.shape[1]]))
    sk = op.Range(op.Constant(value_int=0), op.Squeeze(keys), op.Constant(value_int=1))  # [Sk]
    sq = op.Range(op.Constant(value_int=0), op.Squeeze(op.Shape(q, start=2, end=3)), op.Constant(value_int=1))
    start = op.Constant(value_ints=[0]) if q_pos is None else q_pos
    qi = op.Add(op.Unsqueeze(start, op.Constant(value_ints=[1, 2])),
                op.Unsqueeze(sq, op.Constant(value_ints=[0, 2])))  # [B|1, Sq, 1]
    kj = op.Unsqueeze(sk, op.Constant(value_ints=[0, 1]))  # [1, 1, Sk]
    keep = op.LessOrEqual(kj, qi)
    if window > 0:
        keep = op.And(keep, op.Less(op.Sub(qi, kj), op.Constant(value_int=window)))
    mask = op.Unsqueeze(keep, op.Constant(value_ints=[1]))  # [B|1, 1, Sq, Sk]
    q3 = op.Reshape(op.Transpose(q, perm=[0, 2, 1, 3]), flat)
    # The exporter gives the node all four of the schema's outputs; only Y is used here, and
    # single_output_attention drops the others (present key/value would be copies).
    out = op.Attention(q3, gathered(k_pool), gathered(v_pool), mask, q_num_heads=hq, kv_num_heads=hkv,
                       scale=scale)[0]
    return op.Transpose(op.Reshape(out, op.Constant(value_ints=[0, 0, hq, dv])), perm=[0, 2, 1, 3])


def rotary_embedding_onnx(x, pos, cos_cache, sin_cache):
    """``pdcompile::ort_rotary_embedding`` as ONNX ``RotaryEmbedding`` (opset 23; 4-D input
    ``[B, H, S, D]``, position ids ``[B, 1]``, rotate-half, i.e. not interleaved)."""
    from onnxscript import opset23 as op

    return op.RotaryEmbedding(x, cos_cache, sin_cache, op.Unsqueeze(pos, op.Constant(value_ints=[1])), interleaved=0)


def single_output_attention(model) -> int:
    """Each ONNX ``Attention`` with unused optional outputs -> the same node with output ``Y`` only.

    The exporter builds every node with all of its schema's outputs, and ORT's kernel writes
    each output the node has: ``present_key`` / ``present_value`` would copy the gathered
    keys and values on every step for nothing.
    """
    import onnx_ir as ir

    done = 0
    for node in list(model.graph):
        if node.op_type != "Attention" or node.domain != "" or len(node.outputs) == 1:
            continue
        if any(o.uses() or o.is_graph_output() for o in node.outputs[1:]):
            continue
        new = ir.Node("", "Attention", node.inputs, node.attributes.values(), num_outputs=1, name=node.name)
        ir.convenience.replace_nodes_and_values(model.graph, node, [node], [new], node.outputs[:1], new.outputs)
        done += 1
    return done
