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
import tempfile
from pathlib import Path

import numpy as np
import torch

from ..ops import attention_grouped
from .program import export_program

logger = logging.getLogger(__name__)

_NP = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64, torch.int32: np.int32}


def _require_ort():
    try:
        import onnxruntime  # noqa: F401
        import onnx  # noqa: F401
    except ImportError as e:
        raise ImportError(
            "the onnxruntime backend needs onnx, onnxruntime and onnxscript: pip install 'pdcompile[onnx]'"
        ) from e
    return onnxruntime


def export_onnx(gm: torch.fx.GraphModule, phase: str, path: Path, max_batch_size: int, max_seq_len: int) -> list[str]:
    """Write the phase as an ONNX model at ``path``; returns the output names."""
    _require_ort()
    ep = export_program(gm, phase, max_batch_size, max_seq_len, functional=True)
    ep = ep.run_decompositions({torch.ops.pdcompile.attention.default: attention_grouped})
    n_caches = len(ep.graph_signature.user_outputs) - 1
    outputs = ["logits"] + [f"present_{i}" for i in range(n_caches)]
    prog = torch.onnx.export(ep, dynamo=True, optimize=True, output_names=outputs)
    size = sum(p.numel() * p.element_size() for p in gm.parameters())
    # protobuf caps a file at 2 GB: larger models keep their weights in a side file
    prog.save(str(path), external_data=size > 1_500_000_000)
    return outputs


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
    """Callable running one ONNX phase model: ``(ids, idx, *caches) -> logits``."""

    def __init__(self, path: Path, device: torch.device, threads: int | None = None):
        ort = _require_ort()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or torch.get_num_threads()
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.path = Path(path)
        self.device = device
        self.session = ort.InferenceSession(str(path), opts, providers=providers(device))
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._check_aliasing()
        self._binding = None
        self._bound_key = None
        dev = self.device
        self._ort_device = ("cuda", dev.index or 0) if dev.type == "cuda" else ("cpu", 0)

    def _check_aliasing(self):
        """Each cache input must feed only its ScatterND, or writing in place would be unsafe."""
        import onnx

        model = onnx.load(str(self.path), load_external_data=False)
        consumers: dict[str, list[str]] = {}
        for node in model.graph.node:
            for name in node.input:
                consumers.setdefault(name, []).append(node.op_type)
        self.alias = {}
        for i, name in enumerate(self.input_names[2:]):
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

    def __call__(self, ids: torch.Tensor, idx: torch.Tensor, *caches: torch.Tensor) -> torch.Tensor:
        key = (tuple(c.data_ptr() for c in caches), tuple(caches[0].shape))
        if self._binding is None or key != self._bound_key:
            self._binding = self.session.io_binding()
            for i, (name, cache) in enumerate(zip(self.input_names[2:], caches)):
                self._bind(cache, name)
                if self.alias[i]:
                    self._bind(cache, self.output_names[1 + i], output=True)
            self._copies = {}
            self._bound_key = key
        # small per-call inputs: rebinding costs microseconds
        self._ids, self._idx = ids.contiguous(), idx.contiguous()
        self._bind(self._ids, self.input_names[0])
        self._bind(self._idx, self.input_names[1])
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


def compile_phase(gm: torch.fx.GraphModule, phase: str, example_inputs, options: dict) -> OrtPhase:
    folder = options.get("workdir") or tempfile.mkdtemp(prefix="pdcompile-onnx-")
    path = Path(folder) / f"{phase}.onnx"
    export_onnx(gm, phase, path, options["max_batch_size"], options["max_seq_len"])
    return OrtPhase(path, options.get("device", torch.device("cpu")))


