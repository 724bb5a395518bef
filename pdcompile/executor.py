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

from .phase import STATE_ROLES, PhaseSignature

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
        """``inputs``: a tensor per role, a list of tensors for the KV state (cache or pool)."""
        fn, signature = self.phase(name)
        args, state = [], {}
        for spec in signature.inputs:
            if spec.role in STATE_ROLES:
                i = state.get(spec.role, 0)
                args.append(inputs[spec.role][i])
                state[spec.role] = i + 1
            else:
                args.append(inputs[spec.role])
        return fn(*args)
