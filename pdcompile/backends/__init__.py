"""Backends lower one phase graph (an aten-level FX GraphModule) to something callable.

A backend is a function ``compile(gm, phase, example_inputs, options) -> callable``
registered under a name. The callable takes the phase's flat inputs (see
:mod:`pdcompile.capture`) and returns the logits; it must honour the in-place cache
writes of the graph. Optional backends import their library inside ``compile`` so
that a missing extra fails there, with the extra's name, and nowhere else.
"""

from __future__ import annotations

import importlib
import logging
from typing import Callable

import torch

# name -> "module:function"; resolved lazily so importing pdcompile never imports onnxruntime.
_BACKENDS: dict[str, str] = {
    "eager": "pdcompile.backends.eager:compile_phase",
    "inductor": "pdcompile.backends.inductor:compile_phase",
    "onnxruntime": "pdcompile.backends.onnxruntime:compile_phase",
    "tensorrt": "pdcompile.backends.tensorrt:compile_phase",
}


def register_backend(name: str, target: str | Callable) -> None:
    """Register ``target`` ("module:function" or a callable) as backend ``name``."""
    _BACKENDS[name] = target


def available_backends() -> list[str]:
    return sorted(_BACKENDS)


def get_backend(name: str) -> Callable:
    if name not in _BACKENDS:
        raise ValueError(f"unknown backend {name!r}; available: {', '.join(available_backends())}")
    target = _BACKENDS[name]
    if callable(target):
        return target
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


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
