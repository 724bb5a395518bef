"""TensorRT backend: each phase built into TensorRT engines with torch-tensorrt.

Lowering: ``pdcompile::attention`` is traced as :func:`pdcompile.ops.attention_reference`
(aten SDPA, which torch-tensorrt converts or decomposes, grouped-query attention
included), the cache writes are made functional (``functional_cache.py``: an engine
cannot write into its inputs) and the phase is re-exported with its dynamic dims. The
optimisation profile spans batch 1..max_batch_size, prompt length 1..max_seq_len
(prefill) and cache capacity 2..max_seq_len; kernels are tuned for batch 1, a 128-token
prompt and a 512-slot cache, clipped to the limits (:func:`optimization_profile`).

In process, ``torch_tensorrt.dynamo.compile`` turns the phase into a GraphModule that
runs TensorRT engines (an operator TensorRT cannot convert stays in PyTorch). For
bundles, ``torch_tensorrt.dynamo.convert_exported_program_to_serialized_trt_engine``
builds the whole phase as one plain TensorRT engine, ``<phase>.engine``, which loads
with the TensorRT runtime alone: no pickle, no torch.export archive. An engine only
loads on the GPU model and TensorRT version it was built with.

Running: the engine returns the logits and the updated caches ("presents"); each
present is copied into the caller's cache tensor, which keeps the phase contract's
in-place cache. Needs CUDA, torch-tensorrt and TensorRT (``pdcompile[tensorrt]``).

Written against the documented torch-tensorrt dynamo API and the TensorRT 10 Python
runtime API on machines where TensorRT cannot be installed: it has not been run yet.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..phase import PassContext, PhaseSignature
from . import Backend
from .inductor import _with_reference_attention
from .program import export_program

logger = logging.getLogger(__name__)


_MISSING = (
    "the tensorrt backend needs torch-tensorrt and TensorRT: pip install 'pdcompile[tensorrt]' on a CUDA machine "
    "(Linux or Windows with an NVIDIA GPU; torch-tensorrt must be the build made for this torch version)"
)

# Shapes the kernels are tuned for, clipped to the limits (decode prompts are always 1).
_OPT = {"batch": 1, "prompt": 128, "capacity": 512}

# Build settings shared by both paths.
# - use_explicit_typing: the engine keeps the graph's dtypes, so an fp16/bf16 model runs in
#   its own precision as in eager; enabled_precisions is deprecated in favour of it and
#   {float32} is the only value that mode accepts.
# - disable_tf32: fp32 matmuls stay fp32, as PyTorch's default; TensorRT would otherwise
#   round their inputs to TF32, enough to flip greedy tokens against eager.
_BUILD = {"enabled_precisions": {torch.float32}, "use_explicit_typing": True, "disable_tf32": True}


def _require_trt():
    """``(torch_tensorrt, tensorrt)``, or the ImportError that names the extra."""
    try:
        import tensorrt
        import torch_tensorrt
    except Exception as e:  # no wheel (ImportError), or TensorRT's libraries missing or built for another torch
        raise ImportError(f"{_MISSING} [{type(e).__name__}: {e}]") from e
    return torch_tensorrt, tensorrt


def _cuda_device(device) -> torch.device:
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"TensorRT runs on CUDA devices; this model is on {device}")
    return device


def optimization_profile(ctx: PassContext, pool_blocks: int | None = None):
    """``[(name, min_shape, opt_shape, max_shape, dtype)]`` for the phase's inputs, in order.

    A paged pool has the fixed size the runtime allocated (``pool_blocks``) when known.

    The ranges lie inside the dynamic dims the signature declares for the export, so every
    shape the runtime feeds (capacity rounded up, at least 2) is covered.
    """

    def dim(lo: int, opt: int, hi: int) -> tuple[int, int, int]:
        return lo, max(lo, min(opt, hi)), hi

    sig, max_seq_len = ctx.signature, ctx.max_seq_len
    block = sig.block_size or 1
    ranges = {
        "batch": dim(1, _OPT["batch"], ctx.max_batch_size),
        "seq": dim(1, _OPT["prompt"], max_seq_len),
        "capacity": dim(2, _OPT["capacity"], max(max_seq_len, 2)),
        "blocks_per_seq": dim(1, -(-_OPT["capacity"] // block), -(-max(max_seq_len, 2) // block)),
        "pool_blocks": (pool_blocks,) * 3 if pool_blocks else dim(2, 1024, 1 << 16),
    }
    profile = []
    for spec in sig.inputs:
        dims = [ranges[d] if isinstance(d, str) else (d,) * 3 for d in spec.shape]
        lo, opt, hi = zip(*dims)
        profile.append((spec.name, lo, opt, hi, spec.dtype))
    return profile


def _inputs(torch_tensorrt, ctx: PassContext, pool_blocks):
    return [
        torch_tensorrt.Input(min_shape=lo, opt_shape=opt, max_shape=hi, dtype=dtype)
        for _, lo, opt, hi, dtype in optimization_profile(ctx, pool_blocks)
    ]


def _exported(gm: torch.fx.GraphModule, ctx: PassContext) -> torch.export.ExportedProgram:
    """The phase as TensorRT takes it: aten SDPA attention, functional cache writes."""
    return export_program(_with_reference_attention(gm), ctx, functional=True)


def _write_back(caches, presents) -> None:
    # TensorRT graphs are functional: the updated caches come back as new tensors and are
    # copied into the caller's. That is a full read and write of every cache per step;
    # in-place engine I/O (each present bound to its cache buffer, as the onnxruntime
    # backend does) is the place to optimise this later.
    if len(presents) != len(caches):
        raise RuntimeError(f"the TensorRT phase returned {len(presents)} updated caches for {len(caches)} cache inputs")
    for cache, present in zip(caches, presents):
        cache.copy_(present)


class CompiledPhase:
    """``(*small inputs, *caches) -> logits`` over the GraphModule ``torch_tensorrt.dynamo.compile`` returns."""

    def __init__(self, module: torch.nn.Module, n_small: int):
        self.module, self.n_small = module, n_small

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        outs = self.module(*inputs)  # (logits, present_0, present_1, ...)
        _write_back(inputs[self.n_small:], outs[1:])
        return outs[0]


def _n_small(sig: PhaseSignature) -> int:
    """Inputs before the KV state (ids, positions, block table, ...)."""
    return sum(1 for i in range(len(sig.inputs)) if not sig.is_state(i))


# ----------------------------------------------------------------------------- engines


def _torch_dtype(trt, dtype) -> torch.dtype:
    table = {
        trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.BF16: torch.bfloat16,
        trt.DataType.INT32: torch.int32, trt.DataType.INT64: torch.int64, trt.DataType.INT8: torch.int8,
        trt.DataType.BOOL: torch.bool,
    }
    if dtype not in table:
        raise TypeError(f"TensorRT engine tensor of type {dtype} has no torch dtype here")
    return table[dtype]


_RUNTIME = None  # (trt logger, trt runtime), one per process: it must outlive every engine it loads


def _deserialize(trt, data: bytes, device: torch.device):
    global _RUNTIME
    if _RUNTIME is None:
        log = trt.Logger(trt.Logger.WARNING)
        _RUNTIME = (log, trt.Runtime(log))
    with torch.cuda.device(device):
        engine = _RUNTIME[1].deserialize_cuda_engine(data)
    if engine is None:  # TensorRT logs why; the usual reason is a build for another GPU or TensorRT version
        raise RuntimeError(
            "TensorRT could not load the engine: engines only load on the GPU model and TensorRT version "
            "they were built with; export the bundle again on this machine"
        )
    return engine


def _binding_names(trt, engine, graph_inputs) -> tuple[list[str], list[str]]:
    """The engine's input and output tensor names in the phase contract's order."""
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
    # torch-tensorrt names the inputs after the graph's placeholders and the i-th output
    # "output{i}"; order by those names rather than trust the engine's listing order.
    if sorted(inputs) == sorted(graph_inputs):
        inputs = list(graph_inputs)
    else:
        logger.warning("TensorRT engine inputs %s are not the graph's %s; binding them in engine order",
                       inputs, list(graph_inputs))
    if all(re.fullmatch(r"output\d+", n) for n in outputs):
        outputs.sort(key=lambda n: int(n[len("output"):]))
    return inputs, outputs


class EnginePhase:
    """Callable running one serialized TensorRT engine: ``(*small inputs, *caches) -> logits``."""

    def __init__(self, data: bytes, device: torch.device, inputs: list[str], outputs: list[str], n_small: int):
        _, trt = _require_trt()
        self.device = device
        self.engine = _deserialize(trt, data, device)
        self.n_small = n_small
        if len(outputs) != len(inputs) - self.n_small + 1:  # logits + one present per cache
            raise RuntimeError(f"TensorRT engine with inputs {inputs} and outputs {outputs} is not a pdcompile phase")
        self.inputs, self.outputs = inputs, outputs
        self.dtypes = {n: _torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in inputs + outputs}
        with torch.cuda.device(device):
            self.context = self.engine.create_execution_context()

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        ctx = self.context
        caches = inputs[self.n_small:]
        bound = []  # held until enqueued, or an output could be allocated in a converted input's memory
        for name, t in zip(self.inputs, inputs):
            t = t.to(self.dtypes[name]).contiguous()  # no copy unless the engine took another dtype
            if not ctx.set_input_shape(name, tuple(t.shape)):
                raise ValueError(f"input {name} of shape {tuple(t.shape)} is outside the TensorRT engine's profile")
            ctx.set_tensor_address(name, t.data_ptr())
            bound.append(t)
        outs = []
        for name in self.outputs:  # shapes are known once every input shape is set
            out = torch.empty(tuple(ctx.get_tensor_shape(name)), dtype=self.dtypes[name], device=self.device)
            ctx.set_tensor_address(name, out.data_ptr())
            outs.append(out)
        # Enqueued on torch's current stream: the engine is ordered after the kernels that
        # wrote its inputs and before those that read its outputs, and the caching allocator
        # reuses a freed input's memory only for work queued after it on that stream.
        if not ctx.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise RuntimeError("TensorRT failed to enqueue the engine (see the TensorRT log above)")
        _write_back(caches, outs[1:])
        return outs[0]


@dataclass(frozen=True)
class TensorRTOptions:
    """pool_blocks: the paged pool's size, fixed in the engine's profile (None: a wide range)."""

    pool_blocks: int | None = None


class TensorRTBackend(Backend):
    name = "tensorrt"
    options_class = TensorRTOptions
    native_code = True  # engines (and any plugins) are machine code
    # save() converts the whole phase into one engine; lower() may leave unconvertible ops to
    # PyTorch: serving optimize() from saved engines would refuse models lower() runs
    cacheable = False

    def lower(self, gm: torch.fx.GraphModule, ctx: PassContext) -> CompiledPhase:
        torch_tensorrt, _ = _require_trt()
        device = _cuda_device(ctx.device)
        module = torch_tensorrt.dynamo.compile(
            _exported(gm, ctx),
            inputs=_inputs(torch_tensorrt, ctx, self.options.pool_blocks),
            device=device,
            min_block_size=1,  # no short run of convertible ops is left to PyTorch
            **_BUILD,
        )
        return CompiledPhase(module, _n_small(ctx.signature))

    def save(self, gm: torch.fx.GraphModule, ctx: PassContext, folder: Path) -> dict:
        """Plain TensorRT engine ``<phase>.engine`` in ``folder``, its tensor names in the entry."""
        torch_tensorrt, trt = _require_trt()
        device = _cuda_device(ctx.device)
        ep = _exported(gm, ctx)
        try:
            data = torch_tensorrt.dynamo.convert_exported_program_to_serialized_trt_engine(
                ep, inputs=_inputs(torch_tensorrt, ctx, self.options.pool_blocks), device=device, **_BUILD
            )
        except Exception as e:  # the whole phase must convert: one engine, no PyTorch fallback
            raise RuntimeError(
                f"TensorRT could not build the {ctx.phase} engine ({type(e).__name__}: {e}); torch-tensorrt logs the "
                "operator it could not convert"
            ) from e
        name = f"{ctx.phase}.engine"
        (Path(folder) / name).write_bytes(data)
        # Read the names back from the engine itself: they are what load() binds.
        inputs, outputs = _binding_names(trt, _deserialize(trt, data, device), ep.graph_signature.user_inputs)
        return {"files": [name], "engine_inputs": inputs, "engine_outputs": outputs}

    def load(self, folder: Path, entry: dict, ctx: PassContext) -> EnginePhase:
        _require_trt()
        device = _cuda_device(ctx.device)
        data = (Path(folder) / entry["files"][0]).read_bytes()
        return EnginePhase(data, device, entry["engine_inputs"], entry["engine_outputs"], _n_small(ctx.signature))
