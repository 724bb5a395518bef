"""ONNX Runtime backend: each phase exported to ONNX and run with IO binding.

Lowering: the phase graph gets functional cache writes (``functional_cache.py``), is
re-exported, ``pdcompile::attention`` is decomposed into plain matmul/softmax with
query heads grouped under their kv head (:func:`pdcompile.ops.attention_grouped`, no
copy of the cache for grouped-query attention), and ``torch.onnx.export(dynamo=True)``
writes the model.

Running: inputs are bound from the torch tensors' memory (no copies) and every
``present_i`` output is bound to the buffer of its ``caches_i`` input, so the
ScatterND that writes the new token's k/v updates the cache in place: one cache
lives in torch memory for the whole generation and ORT never copies it. The binding
is kept between calls while the cache buffers stay the same (the decode loop).

Execution providers: TensorRT, CUDA, then CPU, whichever this onnxruntime build has
(``onnxruntime-gpu`` brings the first two); tensors must be on the provider's device.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..ops import attention_grouped, paged_attention_grouped
from ..phase import PassContext, PhaseSignature
from . import Backend
from .program import copy_graph_module, export_program

logger = logging.getLogger(__name__)


_NP = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64, torch.int32: np.int32}
_ORT_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(bfloat16)": "bfloat16",
               "tensor(int64)": "int64", "tensor(int32)": "int32"}


def _require_ort():
    try:
        import onnxruntime  # noqa: F401
        import onnx  # noqa: F401
    except ImportError as e:
        raise ImportError(
            "the onnxruntime backend needs onnx, onnxruntime and onnxscript: pip install 'pdcompile[onnx]'"
        ) from e
    return onnxruntime


@dataclass(frozen=True)
class OrtOptions:
    """threads: intra-op threads of each session (None: torch's thread count)."""

    threads: int | None = None


def onnx_model(gm: torch.fx.GraphModule, ctx: PassContext):
    """The phase as an ``onnx.ModelProto`` with outputs ``logits, present_0, ...``."""
    _require_ort()
    gm = copy_graph_module(gm)
    # Lower the canonical attention by tracing its ONNX-friendly decomposition during the
    # re-export (cheaper than a separate run_decompositions pass over the whole program).
    grouped = {torch.ops.pdcompile.attention.default: attention_grouped,
               torch.ops.pdcompile.paged_attention.default: paged_attention_grouped}
    for node in gm.graph.nodes:
        if node.target in grouped:
            node.target = grouped[node.target]
    gm.recompile()
    ep = export_program(gm, ctx, functional=True)
    n_caches = len(ep.graph_signature.user_outputs) - 1
    outputs = ["logits"] + [f"present_{i}" for i in range(n_caches)]
    prog = torch.onnx.export(ep, dynamo=True, optimize=False, output_names=outputs,
                             custom_translation_table=translation_table())
    _optimize_for_ort(prog.model)
    _drop_identity_transposes(prog.model)
    return prog.model_proto


def translation_table() -> dict:
    """``pdcompile::`` ops the exporter writes as ONNX Runtime contrib ops (not decomposed)."""
    return {torch.ops.pdcompile.weight_only_linear.default: _matmul_nbits}


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


def _optimize_for_ort(model) -> None:
    """onnxscript's optimizer (constant folding of the shape arithmetic a dynamic export
    is full of) and its ONNX Runtime fusions (RMSNorm -> SimplifiedLayerNormalization,
    residual + RMSNorm -> SkipSimplifiedLayerNormalization, rotary -> RotaryEmbedding):
    about 600 -> 450 nodes for an 8-layer Llama decode step, a third faster here.
    Attention is left alone (ours is already the grouped, copy-free form)."""
    import onnxscript

    try:
        from onnxscript.rewriter.ort_fusions import optimize_for_ort
    except ImportError:
        logger.warning("this onnxscript has no ONNX Runtime fusions; the ONNX models run unfused (slower)")
        onnxscript.optimizer.optimize(model)
        return
    optimize_for_ort(model)  # runs the optimizer itself first (with shape inference)


def _drop_identity_transposes(model) -> None:
    """The exporter puts identity transposes in front of ScatterND; without them each cache
    input visibly feeds only its in-place write (see OrtPhase._check_aliasing). onnxscript's
    rule turns them into Identity nodes, which onnx_ir's pass then removes."""
    from onnx_ir.passes.common import IdentityEliminationPass
    from onnxscript import rewriter
    from onnxscript.rewriter.rules.common import no_op_transpose_rule

    rewriter.rewrite(model, pattern_rewrite_rules=[no_op_transpose_rule])
    IdentityEliminationPass()(model)


def export_onnx(gm: torch.fx.GraphModule, ctx: PassContext, path: Path) -> None:
    """Write the phase as an ONNX model file at ``path``."""
    import onnx

    proto = onnx_model(gm, ctx)
    size = sum(p.numel() * p.element_size() for p in gm.parameters())
    # protobuf caps a file at 2 GB: larger models keep their weights in a side file
    big = size > 1_500_000_000
    onnx.save_model(proto, str(path), save_as_external_data=big, all_tensors_to_one_file=True,
                    location=path.name + ".data" if big else None)


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

    def __init__(self, model, signature: PhaseSignature, device: torch.device, threads: int | None = None):
        """``model``: an ONNX file path, or an in-memory ``onnx.ModelProto``."""
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
        if isinstance(model, (str, Path)):
            source = str(model)
            proto = onnx.load(source, load_external_data=False)
        else:
            proto, source = model, model.SerializeToString()
        self.session = ort.InferenceSession(source, opts, providers=providers(device))
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
        """Each cache input must feed only its ScatterND, or writing in place would be unsafe."""
        consumers: dict[str, list[str]] = {}
        for node in model.graph.node:
            for name in node.input:
                consumers.setdefault(name, []).append(node.op_type)
        self.alias = {}
        for i, name in enumerate(self.input_names[self.n_small:]):
            ops = [op for op in consumers.get(name, []) if op != "Shape"]
            self.alias[i] = ops == ["ScatterND"]
            if not self.alias[i]:
                logger.warning("ONNX input %s is read by %s: its update will be copied, not written in place", name, ops)

    def _bind(self, tensor: torch.Tensor, name: str, output: bool = False):
        if tensor.dtype not in _NP:
            raise TypeError(f"the onnxruntime backend supports float32/float16 models, not {tensor.dtype}")
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
        logits = torch.empty(ids.shape[0], *self._logits_tail(ids), dtype=caches[0].dtype, device=ids.device)
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
        return logits

    def _logits_tail(self, ids):
        if not hasattr(self, "_vocab"):
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

    def lower(self, gm: torch.fx.GraphModule, ctx: PassContext) -> OrtPhase:
        try:
            proto = onnx_model(gm, ctx)
        except Exception as e:  # torch.onnx's own report is chained; the user reads what to do
            raise RuntimeError(
                f"the onnxruntime backend could not lower the {ctx.phase} graph ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:300]}). Use backend='inductor' or 'eager' for this model; for "
                "mixture-of-experts models, model.set_experts_implementation('batched_mm') first (README)"
            ) from e
        return OrtPhase(proto, ctx.signature, ctx.device, self.options.threads)

    def save(self, gm: torch.fx.GraphModule, ctx: PassContext, folder: Path) -> dict:
        """``<phase>.onnx`` (and ``<phase>.onnx.data`` for models over 1.5 GB) in ``folder``."""
        name = f"{ctx.phase}.onnx"
        export_onnx(gm, ctx, Path(folder) / name)
        return {"files": [name] + ([name + ".data"] if (Path(folder) / (name + ".data")).exists() else [])}

    def load(self, folder: Path, entry: dict, ctx: PassContext) -> OrtPhase:
        return OrtPhase(Path(folder) / entry["files"][0], ctx.signature, ctx.device, self.options.threads)
