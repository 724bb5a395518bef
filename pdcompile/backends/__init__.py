"""Backends lower one phase graph (an aten-level FX GraphModule) to something callable.

A backend is a function ``compile(gm, phase, example_inputs, options) -> callable``
registered under a name. The callable takes the phase's flat inputs (see
:mod:`pdcompile.capture`) and returns the logits; it must honour the in-place cache
writes of the graph. Optional backends import their library inside ``compile`` so
that a missing extra fails there, with the extra's name, and nowhere else.
"""

from __future__ import annotations

import importlib
from typing import Callable

import torch

# name -> "module:function"; resolved lazily so importing pdcompile never imports onnxruntime.
_BACKENDS: dict[str, str] = {
    "eager": "pdcompile.backends.eager:compile_phase",
    "inductor": "pdcompile.backends.inductor:compile_phase",
    "onnxruntime": "pdcompile.backends.onnxruntime:compile_phase",
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
    """The backend `optimize()` uses when none is named (measured choice, see BENCHMARKS.md)."""
    return "inductor"
