"""ONNX Runtime backend: each phase exported to ONNX and run with IO binding.

Lowering: the phase graph gets functional cache writes (``functional_cache.py``); on
contiguous float32 caches on CPU, prefill and decode attention (with its cache write, and
decode's rotary where it matches) become ONNX Runtime's ``GroupQueryAttention`` contrib op
(``ort_attention.py``); on CPU, ``pdcompile::paged_attention`` becomes ONNX's ``Attention``
(opset 23) over the gathered blocks; the remaining ``pdcompile::attention`` are written
as plain matmul/softmax with query heads grouped under their kv head
(:func:`ort_attention.attention_onnx`, no copy of the cache for grouped-query attention).
The graph becomes an ExportedProgram as it is (``program.program_from_graph``: no second
trace; a graph that needs one is re-exported) and torch.onnx's translation writes the model.
In one-token graphs (decode), the Transposes and Gathers that only move size-1 axes
become Reshapes and collapse (``ort_layout.py``).

Weights: the session reads the model's own parameter memory. The ONNX model refers to
every weight as external data and the session is handed OrtValues over the parameters
(:func:`session_model`); linear layers read the ``[out, in]`` weights through
``FusedMatMul(transB=1)`` rather than a transposed copy. So no model size runs into
protobuf's 2 GB limit, and the weights are not duplicated per phase; only the decode
session keeps ONNX Runtime's pre-packed copy of its matmul weights (``OrtOptions.prepack``).

Running: inputs are bound from the torch tensors' memory (no copies) and every
``present_i`` output is bound to the buffer of its ``caches_i`` input, so the
ScatterND (or GroupQueryAttention) that writes the new token's k/v updates the cache in place: one cache
lives in torch memory for the whole generation and ORT never copies it. The binding
is kept between calls while the cache buffers stay the same (the decode loop).

Execution providers: TensorRT, CUDA, then CPU, whichever this onnxruntime build has
(``onnxruntime-gpu`` brings the first two); tensors must be on the provider's device.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import tempfile
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..ops import paged_attention_grouped
from ..passes.float32_compute import compute_in_float32
from ..passes.functional_cache import functionalize_cache_writes
from ..passes.manager import refresh_meta
from ..passes.utils import ATTENTION, PAGED_ATTENTION as PAGED
from ..phase import PassContext, PhaseSignature
from . import Backend
from .ort_attention import (GQA, ROTARY, attention_onnx, group_query_attention_onnx, lower_decode_rotary,
                            lower_group_query_attention, paged_attention_onnx, rotary_embedding_onnx,
                            single_output_attention)
from .ort_layers import RepeatError, repeat_layers
from .ort_layout import drop_unit_layout_moves
from .program import copy_graph_module, export_program, program_from_graph

logger = logging.getLogger(__name__)

_NP = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64, torch.int32: np.int32}
_ORT_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(bfloat16)": "bfloat16",
               "tensor(int64)": "int64", "tensor(int32)": "int32"}
_TORCH_TYPES = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16, "tensor(bfloat16)": torch.bfloat16}


def _require_ort():
    try:
        import onnxruntime  # noqa: F401
        import onnx  # noqa: F401
    except ImportError as e:
        raise ImportError(
            "the onnxruntime backend needs onnx, onnxruntime and onnxscript: pip install 'pdcompile[onnx]'"
        ) from e
    return onnxruntime


def _opset23() -> bool:
    """Whether the installed ONNX Runtime loads opset 23 models (the ``Attention`` op), from 1.23 on."""
    import onnxruntime

    major, minor = (int(x) for x in onnxruntime.__version__.split(".")[:2])
    if (major, minor) >= (1, 23):
        return True
    logger.info("onnxruntime %s loads no opset 23 model: paged attention stays decomposed (1.23 or newer "
                "runs it as one Attention node per layer)", onnxruntime.__version__)
    return False


PREPACK = ("decode", "all", "none")


@dataclass(frozen=True)
class OrtOptions:
    """threads: intra-op threads of each session (None: torch's thread count).

    group_query_attention: see the field.

    prepack: which phases' sessions let ONNX Runtime keep its own re-laid-out ("pre-packed")
    copy of every matmul weight: "decode" (default), "all" or "none". The weights themselves
    are shared with PyTorch (one copy in the process); a pre-packed copy costs their size
    again, per session. Its matmul kernels are faster on pre-packed weights, which matters
    for decode; a prompt's matmuls re-lay out each weight panel once per call, cheap next to
    the prompt's compute. Measured on R1 (2-core machine, contended, so ratios only): decode
    30 -> 17-22 ms/token pre-packed, prefill about 8% faster. A session holding quantized
    weights (``MatMulNBits``) pre-packs whatever this says: its int8-activation kernels
    need the packed form (see OrtPhase).
    """

    threads: int | None = None
    prepack: str = "decode"
    # Native attention ops (ort_attention.py): decode attention over contiguous caches (and
    # its rotary) as ONNX Runtime's GroupQueryAttention contrib op where it is exact, paged
    # attention as ONNX's Attention over the gathered blocks; False keeps the decomposed
    # matmul/softmax everywhere (for comparison).
    group_query_attention: bool = True
    # Capture four decoder layers and repeat one in the ONNX graph (ort_layers.py) where the
    # model's layers allow it: capture and lowering then take the same time for any depth.
    # False lowers every layer (for comparison; the engine is the same graph).
    repeat_layers: bool = True

    def __post_init__(self):
        if self.prepack not in PREPACK:
            raise ValueError(f"OrtOptions.prepack must be one of {PREPACK}, got {self.prepack!r}")

    def prepacks(self, phase: str) -> bool:
        return self.prepack == "all" or (self.prepack == "decode" and phase == "decode")


def onnx_ir_model(gm: torch.fx.GraphModule, ctx: PassContext, group_query_attention: bool = True,
                  decompose: bool = False):
    """The phase as an ``onnx_ir.Model`` with outputs ``logits, present_0, ...``
    (``decompose``: see :func:`to_onnx`).

    Its weight initializers still hold the model's own parameter tensors (no copy): the
    linear layers read them through ``FusedMatMul(transB=1)`` in PyTorch's ``[out, in]``
    layout, so nothing needs a transposed copy.
    """
    _require_ort()
    gm = copy_graph_module(gm)
    low = _half_dtype(gm) if ctx.device.type == "cpu" else None
    upcast = low is not None
    if upcast:
        logger.info("ONNX Runtime's CPU provider has no %s matmul kernels: the %s graph computes in float32, "
                    "reading the %s weights and KV cache where used (no float32 copy of the model)",
                    low, ctx.phase, low)
        compute_in_float32(gm, low)
    functionalize_cache_writes(gm, ctx.signature)
    if group_query_attention:
        lower_group_query_attention(gm, ctx)
    # The remaining canonical attention has its own translation (attention_onnx). With native
    # attention on, on CPU, paged attention stays one op, written as ONNX's Attention (opset
    # 23, see paged_attention_onnx; ORT's CUDA kernel for it is not verified here); otherwise
    # it becomes its ONNX-friendly decomposition, traced by a re-export of the graph. The rest
    # of the graph keeps the exporter's default opset, whose lowering every other path here
    # was measured with.
    grouped = {}
    if not group_query_attention or ctx.device.type != "cpu" or not _opset23():
        grouped[PAGED] = paged_attention_grouped
    paged = False
    for node in gm.graph.nodes:
        if node.target in grouped:
            node.target = grouped[node.target]
        paged |= node.target is PAGED
    if paged:  # exported at opset 23, which has RotaryEmbedding
        lower_decode_rotary(gm, ctx)
    gm.recompile()
    ep = _program(gm, ctx, reexport=decompose)
    n_caches = len(ep.graph_signature.user_outputs) - 1
    outputs = ["logits"] + [f"present_{i}" for i in range(n_caches)]
    model = to_onnx(ep, outputs, 23 if paged else None, decompose)
    del ep
    _untransposed_weights(model)
    _optimize_for_ort(model, keep_initializers=ctx.layers.weight_pattern if ctx.layers is not None else None)
    _drop_identity_transposes(model)
    if paged:
        single_output_attention(model)
    drop_unit_layout_moves(model)
    if ctx.layers is not None:
        repeat_layers(model, ctx.layers, ctx.signature)
    if upcast:
        _cast_weights_where_used(model)
        model.metadata_props[FLOAT32_COMPUTE] = "1"
    return model


def _program(gm: torch.fx.GraphModule, ctx: PassContext, reexport: bool) -> torch.export.ExportedProgram:
    """The phase as an ExportedProgram: the graph as it is where it can be (no second trace,
    see program_from_graph), else (or with ``reexport``) exported again."""
    if not reexport:
        try:
            refresh_meta(gm)  # the nodes this lowering added have no fake values yet
            ep = program_from_graph(gm)
        except Exception as e:  # torch internals differ: the re-export below is the reference path
            logger.debug("%s: the graph as a program failed (%s: %s)", ctx.phase, type(e).__name__, e)
            ep = None
        if ep is not None:
            return ep
        logger.debug("%s: re-exporting the graph (a node only a trace can lower)", ctx.phase)
    return export_program(gm, ctx)


# The assertion nodes torch.onnx removes before translating (_fx_passes.remove_assertion_nodes)
_ASSERTIONS = {torch.ops.aten._assert_tensor_metadata.default, torch.ops.aten._assert_scalar.default,
               torch.ops.aten._assert_async.default, torch.ops.aten._assert_async.msg,
               torch.ops.aten.sym_constrain_range_for_size.default}


@functools.lru_cache(maxsize=None)
def _registry(opset: int):
    """torch.onnx's translation registry at ``opset`` with our translations, and the ops it
    implements: built once per process and opset (from torchlib's ~1,500 functions: ~0.7 s
    on 2 cores, paid by every phase before), only read by the translation."""
    from torch.onnx._internal.exporter import _decomp, _registration

    registry = _registration.ONNXRegistry.from_torchlib(opset_version=opset)
    for op, fn in translation_table().items():
        registry.register_op(op, fn, is_complex=False)
    return registry, frozenset(_decomp.get_onnx_implemented_overloads(registry))


def to_onnx(ep: torch.export.ExportedProgram, outputs: list[str], opset: int | None, decompose: bool = False):
    """``torch.onnx.export(ep, dynamo=True, optimize=False)`` as an ``onnx_ir.Model``,
    without the exporter's decomposition step where that step has nothing to do.

    The exporter always starts with ``ep.run_decompositions(table)``, a full functionalising
    retrace of the program (measured on SmolLM2, 30 layers: ~40 s of prefill's lowering
    and ~15 s of decode's on 2 cores). Our programs come from program_from_graph (or
    export_program) over a graph that is already ATen, cache writes functional: when every
    op in it has an ONNX translation of its own (the ops decomposition keeps as they are)
    and none mutates, the retrace would rebuild the same graph, so this goes straight to the
    exporter's own type promotion and translation (what it runs after decomposing).
    Those are private functions of torch.onnx: any other program, or a torch whose
    exporter is laid out differently, takes the public export (logged at debug level), as
    does ``decompose=True`` (the reference the tests hold this path to).
    """
    try:
        import torch.fx.experimental._config as fx_config
        from torch.onnx._constants import ONNX_DEFAULT_OPSET
        from torch.onnx._internal._lazy_import import onnxscript_apis
        from torch.onnx._internal.exporter import _core, _flags, _fx_passes, _ir_passes

        opset = opset or ONNX_DEFAULT_OPSET  # what torch.onnx.export defaults to
        registry, implemented = _registry(opset)

        @_flags.set_onnx_exporting_flag  # as for the whole of torch.onnx.export
        def translate(ep):  # what the exporter runs after decomposing
            with fx_config.patch(backed_size_oblivious=True):
                _fx_passes.insert_type_promotion_nodes(ep.graph_module)
                ep._graph_module = _fx_passes.remove_assertion_nodes(ep.graph_module)
            return _core._exported_program_to_onnx_program(ep, registry=registry)
    except (ImportError, AttributeError, TypeError):
        translate = None
    if translate is not None and not decompose:
        for node in ep.graph.nodes:  # a cast as decomposition writes it (ONNX has no aliasing)
            if node.target is torch.ops.aten.to.dtype and not node.kwargs and len(node.args) == 2:
                node.target, node.args, node.kwargs = torch.ops.aten._to_copy.default, node.args[:1], \
                    {"dtype": node.args[1]}
    ops = {n.target for n in ep.graph.nodes if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)}
    left = sorted(str(op) for op in ops - _ASSERTIONS if op not in implemented or op._schema.is_mutable) \
        if translate is not None else ["torch.onnx internals differ"]
    if decompose or left:
        logger.debug("ONNX export with decompositions (%s)", left[:5])
        prog = torch.onnx.export(ep, dynamo=True, optimize=False, output_names=outputs,
                                 custom_translation_table=translation_table(), opset_version=opset)
        return prog.model
    model = onnxscript_apis.convert_version(translate(ep).model, opset)
    _ir_passes.rename_outputs(model, outputs)
    return model


def _cast_weights_where_used(model) -> int:
    """Each ``FusedMatMul(x, Cast(W))`` over a 16-bit weight -> ``If(run-time true)`` around both.

    ONNX Runtime's execution order puts nodes that read initializers only (the float32
    casts of the weights) at the start of the run, so every layer's float32 weights would
    be alive at once, twice the 16-bit model per session (measured on a 12-layer 0.5B:
    the peak of a run grew by 41 MB per layer). Inside an If branch the cast runs when
    the branch does, right before its matmul, and is freed after it: one weight at a time
    (measured: the same peak for 2 and 12 layers). The condition is computed from ``x``
    (always true) so that nothing can fold the If away.
    """
    import onnx_ir as ir

    graph = model.graph
    conditions: dict = {}
    count = 0
    for node in list(graph):
        if node.op_type != "FusedMatMul" or node.domain != "com.microsoft":
            continue
        cast = node.inputs[1].producer()
        if cast is None or cast.op_type != "Cast" or not cast.inputs[0].is_initializer() \
                or len(cast.outputs[0].uses()) != 1:
            continue
        x, weight, out = node.inputs[0], cast.inputs[0], node.outputs[0]
        if x not in conditions:
            size = ir.node("Size", [x])
            one = ir.node("Constant", [], {"value": ir.tensor(np.array(1, dtype=np.int64))})
            total = ir.node("Add", [size.outputs[0], one.outputs[0]])
            flag = ir.node("Cast", [total.outputs[0]], {"to": ir.DataType.BOOL})
            for i, n in enumerate((size, one, total, flag)):
                n.outputs[0].name = f"{out.name}_cond_{i}"
            graph.insert_before(node, [size, one, total, flag])
            conditions[x] = flag.outputs[0]

        def branch(tag):
            c = ir.node("Cast", [weight], {"to": cast.attributes["to"].as_int()})
            c.outputs[0].name = f"{out.name}_{tag}_w"
            mm = ir.node("FusedMatMul", [x, c.outputs[0]], {a.name: a for a in node.attributes.values()},
                         domain="com.microsoft")
            mm.outputs[0].name = f"{out.name}_{tag}"
            mm.outputs[0].dtype, mm.outputs[0].shape = out.dtype or x.dtype, out.shape
            return ir.Graph([], [mm.outputs[0]], nodes=[c, mm], name=f"{out.name}_{tag}",
                            opset_imports=dict(model.opset_imports))

        wrapped = ir.node("If", [conditions[x]], {"then_branch": branch("then"), "else_branch": branch("else")})
        ir.convenience.replace_nodes_and_values(graph, node, [node], [wrapped], [out], wrapped.outputs)
        graph.remove(cast, safe=True)
        count += 1
    return count


# Model metadata of a graph made by compute_in_float32: ONNX Runtime must not constant-fold
# its weight casts (that would store a float32 copy of every bfloat16 weight).
FLOAT32_COMPUTE = "pdcompile.float32_compute"


def _half_dtype(gm: torch.fx.GraphModule) -> torch.dtype | None:
    """bfloat16 or float16 when the graph's weights or KV cache are stored in it."""
    tensors = [v for n in gm.graph.nodes if n.op == "placeholder" and isinstance(v := n.meta.get("val"), torch.Tensor)]
    tensors += [t for t in list(gm.parameters()) + list(gm.buffers())]
    return next((t.dtype for t in tensors if t.dtype in (torch.bfloat16, torch.float16)), None)


def _untransposed_weights(model) -> int:
    """``MatMul(x, Transpose(W))`` over a 2-D initializer ``W`` -> ``FusedMatMul(x, W, transB=1)``.

    The exporter writes every ``linear`` as a MatMul of the transposed weight, and both
    onnxscript's constant folding and ONNX Runtime's would fold that Transpose into a new,
    transposed copy of the weight: one more copy of the whole model per phase. ONNX
    Runtime's FusedMatMul reads ``W`` as it is (its M=1 decode kernel streams rows of W).
    """
    import onnx_ir as ir

    graph = model.graph
    count = 0
    for node in list(graph):
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
            continue
        transpose = node.inputs[1].producer()
        if transpose is None or transpose.op_type != "Transpose" or transpose.domain not in ("", "ai.onnx"):
            continue
        weight = transpose.inputs[0]
        perm = transpose.attributes.get("perm")
        stored = weight.producer().inputs[0] if weight.producer() is not None and weight.producer().op_type == "Cast" \
            else weight  # a bfloat16 weight read in float32 (compute_in_float32)
        if not stored.is_initializer() or weight.shape is None or len(weight.shape) != 2 \
                or perm is None or list(perm.as_ints()) != [1, 0]:
            continue
        fused = ir.node("FusedMatMul", [node.inputs[0], weight], {"transB": 1, "alpha": 1.0},
                        domain="com.microsoft")
        ir.convenience.replace_nodes_and_values(graph, node, [node], [fused], node.outputs, fused.outputs)
        if not transpose.outputs[0].uses():
            graph.remove(transpose, safe=True)
        count += 1
    if count:
        model.opset_imports.setdefault("com.microsoft", 1)
    return count


# Initializers at least this large are not serialized: ONNX Runtime gets them as OrtValues
# over the tensors' own memory (see session_model).
_ALIAS_MIN_BYTES = 1024
_WEIGHTS_FILE = "weights.placeholder"


@dataclass
class SessionModel:
    """An ONNX model whose large initializers live in memory the process already has.

    ``proto`` refers to each of them as external data in :data:`_WEIGHTS_FILE` (``data_bytes``
    long); ``initializers`` holds an OrtValue over the tensor's own memory for each, and
    ``keep`` the tensors that memory belongs to (OrtValues made this way do not own it).
    """

    proto: object
    initializers: dict
    keep: list
    data_bytes: int


def session_model(model, device: torch.device) -> SessionModel:
    """Take the large initializers out of ``model`` (an ``onnx_ir.Model``, changed in place).

    ONNX Runtime serializes nothing and copies nothing of them: the session is given the
    OrtValues as shared initializers (``SessionOptions.add_initializer``, its mechanism for
    sharing weights between sessions), so the weights exist once in the process, shared by
    PyTorch and by every phase's session, and the proto stays far below protobuf's 2 GB
    limit. (``add_external_initializers`` would copy them: measured, ONNX Runtime 1.32.)
    """
    import onnx_ir as ir
    from torch.onnx._internal.exporter._core import TorchTensor

    ort = _require_ort()
    values, keep, offset = {}, [], 0
    for name, value in model.graph.initializers.items():
        tensor = value.const_value
        if tensor is None or tensor.nbytes < _ALIAS_MIN_BYTES:
            continue
        if isinstance(tensor, TorchTensor):  # a parameter or buffer, on the model's device, any dtype
            raw = tensor.raw.detach()
            if not raw.is_contiguous():
                continue
            keep.append(raw)
            values[name] = ort.OrtValue.from_dlpack(raw.__dlpack__())
        elif device.type == "cpu" and isinstance(tensor, ir.Tensor) and tensor.dtype.numpy().kind in "fiub":
            array = np.ascontiguousarray(tensor.numpy())  # a constant computed by the optimizer
            keep.append(array)
            values[name] = ort.OrtValue.ortvalue_from_numpy(array)
        else:
            continue  # serialized with the graph
        value.const_value = ir.ExternalTensor(_WEIGHTS_FILE, offset, tensor.nbytes, tensor.dtype, shape=tensor.shape,
                                              name=name)
        offset += tensor.nbytes
    return SessionModel(ir.serde.serialize_model(model), values, keep, offset)


def _session(source, opts, device, shared: SessionModel | None, disabled_optimizers=()):
    """An InferenceSession of ``source`` (a path or model bytes), or of ``shared``'s proto.

    For a :class:`SessionModel`, ONNX Runtime insists that the external-data file its proto
    names exists (it checks the path while loading the graph) even though every tensor in
    it comes from ``add_initializer``: the proto goes into a temporary folder next to an
    empty sparse file of the right length (no disk blocks), both gone once the session
    is made. Nothing is read from that file: the tests compare outputs with PyTorch's.
    """
    ort = _require_ort()
    kw = {"providers": providers(device), "disabled_optimizers": list(disabled_optimizers)}
    if shared is None:
        return ort.InferenceSession(source, opts, **kw)
    for name, value in shared.initializers.items():
        opts.add_initializer(name, value)
    with tempfile.TemporaryDirectory(prefix="pdcompile-ort-") as tmp:
        with open(os.path.join(tmp, _WEIGHTS_FILE), "wb") as f:
            f.truncate(shared.data_bytes)
        path = os.path.join(tmp, "model.onnx")
        with open(path, "wb") as f:
            f.write(shared.proto.SerializeToString())
        return ort.InferenceSession(path, opts, **kw)


def translation_table() -> dict:
    """``pdcompile::`` ops the exporter writes as ONNX Runtime contrib ops (not decomposed)."""
    return {torch.ops.pdcompile.weight_only_linear.default: _matmul_nbits, GQA: group_query_attention_onnx,
            PAGED: paged_attention_onnx, ROTARY: rotary_embedding_onnx, ATTENTION: attention_onnx}


def _matmul_nbits(x, qweight, scales, zero_points=None, bias=None, bits: int = 8, group_size: int = 32,
                  accuracy_level: int = 0):
    """``pdcompile::weight_only_linear`` -> ``com.microsoft::MatMulNBits`` (traced by the exporter).

    The op's buffers already are MatMulNBits' inputs (codes [N, K/G, G*bits/8] low nibble
    first, scales [N*K/G], packed uint8 zero points or none for the symmetric 2**(bits-1)),
    so they become its initializers unchanged. The bias is a separate Add: MatMulNBits'
    own bias input came late to onnxruntime, and the Add costs one small kernel.
    """
    from onnxscript import opset18 as op

    n, n_groups = qweight.shape[0], qweight.shape[1]
    y = _matmul_nbits_op()(x, qweight, scales, zero_points, K=n_groups * group_size, N=n, bits=bits,
                           block_size=group_size, accuracy_level=accuracy_level)
    return y if bias is None else op.Add(y, bias)


def _matmul_nbits_op():
    """MatMulNBits as an onnxscript op. onnx itself has no schema for ONNX Runtime's contrib
    ops, and onnxscript needs one to tell inputs from attributes: this is the part of
    onnxruntime's schema (contrib_defs.cc) the lowering uses."""
    import onnxscript
    from onnx.defs import OpSchema

    param, optional = OpSchema.FormalParameter, OpSchema.FormalParameterOption.Optional
    attrs = [OpSchema.Attribute(a, OpSchema.AttrType.INT, "") for a in ("K", "N", "bits", "block_size", "accuracy_level")]
    schema = OpSchema(
        "MatMulNBits", "com.microsoft", 1,
        inputs=[param("A", "T1"), param("B", "T2"), param("scales", "T1"),
                param("zero_points", "T3", param_option=optional)],
        outputs=[param("Y", "T1")],
        type_constraints=[("T1", ["tensor(float)", "tensor(float16)"], ""), ("T2", ["tensor(uint8)"], ""),
                          ("T3", ["tensor(uint8)", "tensor(float)", "tensor(float16)"], "")],
        attributes=attrs,
    )
    return onnxscript.values.Op(onnxscript.values.Opset("com.microsoft", 1), "MatMulNBits", schema)


def _optimize_for_ort(model, keep_initializers: str | None = None) -> None:
    """onnxscript's optimizer (constant folding of the shape arithmetic a dynamic export
    is full of) and its ONNX Runtime fusions (RMSNorm -> SimplifiedLayerNormalization,
    residual + RMSNorm -> SkipSimplifiedLayerNormalization, rotary -> RotaryEmbedding where
    its pattern matches, which HF's rotary as exported does not, measured on SmolLM2):
    about 600 -> 450 nodes for an 8-layer Llama decode step, a third faster here.
    Attention is left alone (GroupQueryAttention already, or the grouped, copy-free form).

    Without the optimizer's ``SlicesSplit`` rule (two Slices of one tensor -> Split): it is
    the one rule with a two-output pattern, which onnxscript 0.7 matches by enumerating
    graph nodes for every candidate (``rewriter/_matcher.py``), quadratic in graph size.
    On SmolLM2 (30 layers) it was 46 s of the decode graph's 54 s here and most of the
    prefill graph's 98 s. What it would merge are the rotary's two half-slices: gone from
    decode (GroupQueryAttention / RotaryEmbedding), two Slices instead of one Split in
    prefill (the same bytes copied).

    ``keep_initializers``: a pattern of initializer names the optimizer must not merge with
    equal ones, so that each layer keeps its own weights by name for repeat_layers (a freshly
    initialised model's norm weights are all ones).
    """
    import onnxscript

    try:
        from onnxscript.rewriter.ort_fusions import optimize_for_ort
    except ImportError:
        logger.warning("this onnxscript has no ONNX Runtime fusions; the ONNX models run unfused (slower)")
        optimize_for_ort = onnxscript.optimizer.optimize
    with _without_rules("SlicesSplit"), _dedup_except(keep_initializers):
        optimize_for_ort(model)  # runs the optimizer itself first (with shape inference)


_RULES_LOCK = threading.RLock()  # re-entered by _dedup_except inside _without_rules


@contextlib.contextmanager
def _without_rules(*names: str):
    """onnxscript's default rewrite rules less ``names``, for the optimizer calls inside.

    The optimizer reads the module's rule tuple at each call and takes no rule list of its
    own, so the tuple is swapped for the duration (under a lock: lowering may run from
    several threads) and put back, whatever happens."""
    from onnxscript import rewriter

    with _RULES_LOCK:
        rules = getattr(rewriter, "_DEFAULT_REWRITE_RULES", None)
        if rules is None:  # laid out differently: its optimizer as it is (the test names the rule)
            yield
            return
        rewriter._DEFAULT_REWRITE_RULES = tuple(r for r in rules if getattr(r, "name", None) not in names)
        try:
            yield
        finally:
            rewriter._DEFAULT_REWRITE_RULES = rules


@contextlib.contextmanager
def _dedup_except(pattern: str | None):
    """onnx_ir's DeduplicateInitializersPass, for the optimizer calls inside, leaving alone the
    initializers whose names match ``pattern`` (None: the pass as it is). The optimizer builds
    its pass list from onnx_ir's module at each call, so the class is swapped for the
    duration, under the rules' lock."""
    import onnx_ir.passes.common as common_passes

    base = getattr(common_passes, "DeduplicateInitializersPass", None)
    if pattern is None or base is None:
        yield
        return
    keep = re.compile(pattern)

    class KeepingLayerWeights(base):
        def call(self, model):
            graph = model.graph
            kept = [v for name, v in graph.initializers.items() if keep.match(name)]
            for v in kept:
                graph.initializers.pop(v.name)
            try:
                return super().call(model)
            finally:
                for v in kept:
                    graph.register_initializer(v)

    with _RULES_LOCK:
        common_passes.DeduplicateInitializersPass = KeepingLayerWeights
        try:
            yield
        finally:
            common_passes.DeduplicateInitializersPass = base


def _drop_identity_transposes(model) -> None:
    """The exporter puts identity transposes in front of ScatterND; without them each cache
    input visibly feeds only its in-place write (see OrtPhase._check_aliasing). onnxscript's
    rule turns them into Identity nodes, which onnx_ir's pass then removes."""
    from onnx_ir.passes.common import IdentityEliminationPass
    from onnxscript import rewriter
    from onnxscript.rewriter.rules.common import no_op_transpose_rule

    rewriter.rewrite(model, pattern_rewrite_rules=[no_op_transpose_rule])
    IdentityEliminationPass()(model)


# Bundles and compile-cache entries: a phase whose weights are larger than this keeps them in
# a side file ``<phase>.onnx.data``. Protobuf cannot hold a model over 2 GB, and loading is
# faster from a side file: with the weights inside the protobuf, both onnx.load (OrtPhase
# reads the graph) and ONNX Runtime parse them, and ONNX Runtime copies them out of the
# parsed message. Measured on R1's decode phase (223 MB, 2 cores): the session 0.9 -> 0.3 s,
# onnx.load + ByteSize 1.2 s -> ~0. Tiny models keep one file. A module constant so that a
# test can send a tiny model down the path a large one takes.
EXTERNAL_DATA_BYTES = 1 << 20


def export_onnx(gm: torch.fx.GraphModule, ctx: PassContext, path: Path, group_query_attention: bool = True) -> list[str]:
    """Write the phase as an ONNX model file at ``path``; returns the file names written."""
    import onnx_ir as ir

    path = Path(path)
    model = onnx_ir_model(gm, ctx, group_query_attention)
    size = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    if size > EXTERNAL_DATA_BYTES:
        # onnx_ir writes the tensors one by one from the parameters' memory: no copy of the model
        ir.save(model, path, external_data=path.name + ".data")
        return [path.name, path.name + ".data"]
    ir.save(model, path)
    return [path.name]


def providers(device: torch.device) -> list[str]:
    ort = _require_ort()
    have = ort.get_available_providers()
    if device.type == "cuda":
        wanted = ["TensorrtExecutionProvider", "CUDAExecutionProvider"]
        chosen = [p for p in wanted if p in have]
        if not chosen:
            raise RuntimeError(f"the model is on {device} but this onnxruntime has no CUDA provider ({have}); "
                               "pip install onnxruntime-gpu")
        return chosen + ["CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OrtPhase:
    """Callable running one ONNX phase model: the signature's inputs in order -> logits."""

    def __init__(self, model, signature: PhaseSignature, device: torch.device, threads: int | None = None,
                 prepack: bool = True):
        """``model``: an ONNX file path, an ``onnx.ModelProto``, or a :class:`SessionModel`
        (weights shared with the process, see :func:`session_model`). ``prepack``: let ONNX
        Runtime keep its own re-laid-out copy of each matmul weight (see OrtOptions)."""
        import onnx

        ort = _require_ort()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or torch.get_num_threads()
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Threads spin inside a run but stop at its end: idle sessions (prefill while
        # decoding, and the other way round) must not burn the cores the next run needs.
        opts.add_session_config_entry("session.force_spinning_stop", "1")
        self.device = device
        shared = model if isinstance(model, SessionModel) else None
        self.keep = (shared.keep, shared.initializers) if shared else ()  # the memory the session reads
        if shared:
            proto, source = shared.proto, None
        elif isinstance(model, (str, Path)):
            source = str(model)
            proto = onnx.load(source, load_external_data=False)
        else:
            proto, source = model, model.SerializeToString()
        # what the session was given: the protobuf (graph, small constants) and the weights outside it
        # (a file's size, not ByteSize(): that walks every tensor of a model saved with its weights inside)
        proto_bytes = os.path.getsize(source) if isinstance(source, str) else (
            len(source) if isinstance(source, bytes) else proto.ByteSize())
        self.proto_bytes, self.shared_bytes = proto_bytes, shared.data_bytes if shared else 0
        # the graph as lowered (before ONNX Runtime's own fusions): node count by op type
        self.op_types = Counter(node.op_type for node in proto.graph.node)
        # MatMulNBits computes its int8-activation form (accuracy_level 4) only on weights it
        # pre-packed: without pre-packing onnxruntime 1.32 silently computes with fp32
        # activations, a different function from the other backends'. Its codes are a quarter
        # (int8) or an eighth (int4) of the fp32 bytes, so their packed copy is cheap.
        if not (prepack or self.op_types["MatMulNBits"]):
            opts.add_session_config_entry("session.disable_prepacking", "1")
        float32_compute = any(p.key == FLOAT32_COMPUTE for p in proto.metadata_props)
        if float32_compute:
            # Its largest temporaries are float32 copies of single weights (the tied lm_head:
            # the whole embedding table), made and freed once per run; the arena would keep
            # a block of every size it met (measured: 1.9x the weights' float32 size kept).
            opts.enable_cpu_mem_arena = False
        self.session = _session(source, opts, device, shared, ["ConstantFolding"] if float32_compute else ())
        self.logits_dtype = signature.outputs[0].dtype  # the model's: a float32-compute graph's are cast back
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        # per-call inputs (ids, positions, block table, ...) come first, then the caches/pools
        self.n_small = sum(1 for i in range(len(signature.inputs)) if not signature.is_state(i))
        if len(self.input_names) != len(signature.inputs):
            raise ValueError(f"the ONNX model takes {len(self.input_names)} inputs, its {signature.phase} signature "
                             f"{len(signature.inputs)}")
        self._check_aliasing(proto)
        self._binding = None
        self._bound_key = None
        dev = self.device
        self._ort_device = ("cuda", dev.index or 0) if dev.type == "cuda" else ("cpu", 0)

    def declared_io(self) -> tuple[list[dict], list[dict]]:
        """Inputs and outputs as the ONNX model itself declares them, in a bundle's phase
        signature form: ``{"name", "dtype", "shape"}``, a dimension's name where it is dynamic."""

        def sig(args):
            return [{"name": a.name, "dtype": _ORT_DTYPES.get(a.type, a.type),
                     "shape": [d if isinstance(d, int) else str(d) for d in a.shape]} for a in args]

        return sig(self.session.get_inputs()), sig(self.session.get_outputs())

    def _check_aliasing(self, model):
        """Each cache input must feed only its ScatterND, or be the past_key/past_value of one
        GroupQueryAttention whose present is its ``present_i`` (GQA then writes into the shared
        buffer), or writing in place would be unsafe."""
        consumers: dict[str, list[str]] = {}
        gqa_present: dict[str, str] = {}  # past input -> the present output GQA writes it to
        for node in model.graph.node:
            for slot, name in enumerate(node.input):
                consumers.setdefault(name, []).append(node.op_type)
                if node.op_type == "GroupQueryAttention" and slot in (3, 4):
                    gqa_present[name] = node.output[slot - 2]
        self.alias = {}
        for i, name in enumerate(self.input_names[self.n_small:]):
            ops = [op for op in consumers.get(name, []) if op != "Shape"]
            self.alias[i] = ops == ["ScatterND"] or (
                ops == ["GroupQueryAttention"] and gqa_present.get(name) == self.output_names[1 + i])
            if not self.alias[i]:
                logger.warning("ONNX input %s is read by %s: its update will be copied, not written in place", name, ops)

    def _bind(self, tensor: torch.Tensor, name: str, output: bool = False):
        if tensor.dtype not in _NP:
            # no numpy dtype (bfloat16): bind an OrtValue over the tensor's memory (DLPack, no copy)
            value = _require_ort().OrtValue.from_dlpack(tensor.__dlpack__())
            (self._binding.bind_ortvalue_output if output else self._binding.bind_ortvalue_input)(name, value)
            return
        kind, index = self._ort_device
        args = (name, kind, index, _NP[tensor.dtype], list(tensor.shape), tensor.data_ptr())
        (self._binding.bind_output if output else self._binding.bind_input)(*args)

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        small, caches = inputs[: self.n_small], inputs[self.n_small:]
        key = (tuple(c.data_ptr() for c in caches), tuple(caches[0].shape))
        if self._binding is None or key != self._bound_key:
            self._binding = self.session.io_binding()
            for i, (name, cache) in enumerate(zip(self.input_names[self.n_small:], caches)):
                self._bind(cache, name)
                if self.alias[i]:
                    self._bind(cache, self.output_names[1 + i], output=True)
            self._bound_key = key
        # small per-call inputs: rebinding costs microseconds; keep them alive until run
        self._small = [t.contiguous() for t in small]
        for name, t in zip(self.input_names, self._small):
            self._bind(t, name)
        ids = self._small[0]
        logits = torch.empty(ids.shape[0], *self._logits_tail(ids), dtype=self._out_dtype, device=ids.device)
        self._bind(logits, self.output_names[0], output=True)
        for i, name in enumerate(self.output_names[1:]):
            if not self.alias[i]:
                self._binding.bind_output(name, self._ort_device[0], self._ort_device[1])
        self.session.run_with_iobinding(self._binding)
        if not all(self.alias.values()):
            outs = self._binding.get_outputs()
            for i, cache in enumerate(caches):
                if not self.alias[i]:
                    cache.copy_(torch.from_numpy(outs[1 + i].numpy()))
        return logits.to(self.logits_dtype)

    def _logits_tail(self, ids):
        if not hasattr(self, "_vocab"):
            self._out_dtype = _TORCH_TYPES[self.session.get_outputs()[0].type]
            shape = self.session.get_outputs()[0].shape
            self._vocab = shape[-1] if isinstance(shape[-1], int) else None
            self._rank = len(shape)
        tail = [self._vocab]
        if self._rank == 3:  # score graph: [B, S, V]
            tail = [ids.shape[1], self._vocab]
        return tail


class OrtBackend(Backend):
    name = "onnxruntime"
    options_class = OrtOptions
    native_code = False  # ONNX files are data: operators come from the installed onnxruntime
    # The CPU provider has no bfloat16 MatMul (float32_compute.py): a bf16-prefill phase runs
    # on the eager backend, where aten.linear reaches oneDNN's AVX-512 BF16 / AMX kernels.
    bf16_matmuls = False
    repeats_layers = True  # ort_layers.py

    def prepacked_copies(self, dtype: torch.dtype, device: torch.device) -> int:
        """Sessions of optimize() (prefill, decode) that will keep a pre-packed copy of the
        weights: none for 16-bit weights on CPU, which are cast where used (nothing to pre-pack)."""
        if device.type == "cpu" and dtype in (torch.bfloat16, torch.float16):
            return 0
        return sum(self.options.prepacks(p) for p in ("prefill", "decode"))

    def lower(self, gm: torch.fx.GraphModule, ctx: PassContext) -> OrtPhase:
        try:
            model = onnx_ir_model(gm, ctx, self.options.group_query_attention)
        except RepeatError:
            raise  # optimize() lowers every layer instead
        except Exception as e:  # torch.onnx's own report is chained; the user reads what to do
            raise RuntimeError(
                f"the onnxruntime backend could not lower the {ctx.phase} graph ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:300]}). Use backend='inductor' or 'eager' for this model; for "
                "mixture-of-experts models, model.set_experts_implementation('batched_mm') first (README)"
            ) from e
        return OrtPhase(session_model(model, ctx.device), ctx.model_signature, ctx.device,
                        self.options.threads, prepack=self.options.prepacks(ctx.phase))

    def save(self, gm: torch.fx.GraphModule, ctx: PassContext, folder: Path) -> dict:
        """``<phase>.onnx`` (and ``<phase>.onnx.data`` beyond EXTERNAL_DATA_BYTES of weights) in ``folder``."""
        return {"files": export_onnx(gm, ctx, Path(folder) / f"{ctx.phase}.onnx", self.options.group_query_attention)}

    def load(self, folder: Path, entry: dict, ctx: PassContext) -> OrtPhase:
        return OrtPhase(Path(folder) / entry["files"][0], ctx.model_signature, ctx.device, self.options.threads,
                        prepack=self.options.prepacks(ctx.phase))
