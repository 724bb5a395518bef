"""Backends lower one phase graph (an aten-level FX GraphModule) to something callable.

Every backend is a :class:`Backend`: ``lower(gm, ctx)`` returns a callable taking the
phase's flat inputs in signature order (``ctx.signature``) and returning the logits,
honouring the graph's in-place KV writes; ``save``/``load`` write and read the phase as
engine files for a bundle. Options are one frozen dataclass per backend. There is one
registry, :data:`BACKENDS`, used by ``optimize()``, ``export()`` and ``load()`` alike.
Optional backends import their library inside their methods, so that a missing extra
fails there, with the extra's name, and nowhere else.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
from pathlib import Path
from typing import Callable, ClassVar

import torch

from ..phase import PassContext


@dataclasses.dataclass(frozen=True)
class NoOptions:
    pass


class Backend:
    """The backend protocol (and the defaults of its optional parts)."""

    name: ClassVar[str]
    options_class: ClassVar[type] = NoOptions
    # Its bundle files hold machine code that loading runs (AOTInductor .so, TensorRT
    # engines): pdcompile.load() asks for trust_native_code=True (see bundle.py). A backend
    # that does not say is treated as native: consent is the safe default.
    native_code: ClassVar[bool] = True
    exportable: ClassVar[bool] = True
    # optimize() may lower through save()+load() into the compile cache and run the loaded
    # engine (pdcompile/compile_cache.py): true where that engine is the one lower() makes
    cacheable: ClassVar[bool] = True
    # It runs bfloat16 matrix products (the bf16_matmuls pass, OptimizeConfig.prefill_dtype).
    # Where it does not, optimize() runs those phases on the eager backend instead.
    bf16_matmuls: ClassVar[bool] = True
    # It can lower a graph of a few decoder layers and repeat one (PassContext.layers):
    # capture and lowering then cost the same for 8 layers as for 80.
    repeats_layers: ClassVar[bool] = False

    def __init__(self, options=None):
        options = options if options is not None else self.options_class()
        if not isinstance(options, self.options_class):
            raise TypeError(f"the {self.name} backend takes {self.options_class.__name__} options, "
                            f"got {type(options).__name__}")
        self.options = options

    def lower(self, gm: torch.fx.GraphModule, ctx: PassContext) -> Callable:
        raise NotImplementedError

    def save(self, gm: torch.fx.GraphModule, ctx: PassContext, folder: Path) -> dict:
        """Write the phase's engine file(s) into ``folder``; returns ``{"files": [...], ...}``."""
        raise ValueError(f"the {self.name} backend has no engine file format; bundles can be written for "
                         f"{', '.join(exportable_backends())}")

    def load(self, folder: Path, entry: dict, ctx: PassContext) -> Callable:
        raise ValueError(f"the {self.name} backend cannot load engine files")


# name -> "module:class"; resolved lazily so importing pdcompile never imports onnxruntime.
BACKENDS: dict[str, str | type] = {
    "eager": "pdcompile.backends.eager:EagerBackend",
    "inductor": "pdcompile.backends.inductor:InductorBackend",
    "onnxruntime": "pdcompile.backends.onnxruntime:OrtBackend",
    "tensorrt": "pdcompile.backends.tensorrt:TensorRTBackend",
}


def register_backend(name: str, target: str | type) -> None:
    """Register ``target`` (a :class:`Backend` subclass, or "module:Class") as backend ``name``."""
    BACKENDS[name] = target


def available_backends() -> list[str]:
    return sorted(BACKENDS)


def backend_class(name: str) -> type:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; available: {', '.join(available_backends())}")
    target = BACKENDS[name]
    if isinstance(target, str):
        module, cls = target.split(":")
        target = getattr(importlib.import_module(module), cls)
    return target


def get_backend(name: str, options=None) -> Backend:
    return backend_class(name)(options)


def exportable_backends() -> list[str]:
    return [n for n in available_backends() if backend_class(n).exportable]


def default_backend(device: torch.device) -> str:
    """The backend `optimize()` uses when none is named (measured choice, see BENCHMARKS.md).

    CPU: onnxruntime -- its matrix-vector kernels stream weights ~2-4x faster than the
    aten matmuls inductor calls, which decides decode; it also had the lowest TTFT.
    Without the `onnx` extra installed, inductor, with a warning. GPU: inductor.
    """
    if device.type == "cpu":
        try:
            import onnx  # noqa: F401
            import onnxruntime  # noqa: F401
            import onnxscript  # noqa: F401

            return "onnxruntime"
        except ImportError:
            logging.getLogger(__name__).warning(
                "onnxruntime is not installed (pip install 'pdcompile[onnx]'); using the inductor backend, "
                "which decodes ~2x slower on CPU"
            )
    return "inductor"
