"""The step executor: calls one compiled phase graph on inputs given by role.

It owns no KV state and no per-call state (the KV manager in kv_cache.py owns the
buffers): it orders the inputs as the phase's :class:`~pdcompile.phase.PhaseSignature`
lists them and calls the backend's callable. Phases that are built on first use (extend,
score) come from ``lazy``.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

from .phase import PhaseSignature

logger = logging.getLogger(__name__)


class StepExecutor:
    def __init__(self, phases: dict[str, tuple[Callable, PhaseSignature]],
                 lazy: dict[str, Callable[[], tuple[Callable, PhaseSignature]]] | None = None):
        self.phases = dict(phases)
        self.lazy = dict(lazy or {})

    def phase(self, name: str) -> tuple[Callable, PhaseSignature]:
        if name not in self.phases:
            if name not in self.lazy:
                raise NotImplementedError(
                    f"the {name} graph is not available here (a loaded bundle carries prefill, decode and, when it was "
                    "optimized with prefix caching, extend)"
                )
            logger.info("building the %s graph on first use (one-time)", name)
            self.phases[name] = self.lazy.pop(name)()
        return self.phases[name]

    def run(self, name: str, inputs: dict) -> torch.Tensor:
        """``inputs``: a tensor per role, or a list of tensors, in signature order, for a role the
        signature lists several times (the KV state; a paged model's block tables and slot
        mappings, one per KV group)."""
        fn, signature = self.phase(name)
        args, seen = [], {}
        for spec in signature.inputs:
            value = inputs[spec.role]
            if isinstance(value, (list, tuple)):
                i = seen.get(spec.role, 0)
                value = value[i]
                seen[spec.role] = i + 1
            args.append(value)
        return fn(*args)
