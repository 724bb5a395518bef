"""The one place that knows how transformers releases differ in what pdcompile calls.

transformers 5.24 renamed the causal-LM forward's cache argument and the output field
from ``past_key_values`` to ``cache`` (the old name still works there, with a deprecation
warning, until 5.40). Which name a model takes is read from its ``forward`` signature,
never from a version string, so a model class that keeps the old name on a new release
(remote code, a fork) works too.
"""

from __future__ import annotations

import dataclasses
import inspect

import torch

CACHE_ARG_NAMES = ("cache", "past_key_values")  # newest first


def cache_arg(model: torch.nn.Module) -> str | None:
    """The name of ``model.forward``'s KV-cache argument, or ``None`` if it takes none."""
    params = inspect.signature(model.forward).parameters
    return next((name for name in CACHE_ARG_NAMES if name in params), None)


def output_cache_field(output_cls) -> str:
    """The cache field of an HF output dataclass (``CausalLMOutputWithPast``, ...)."""
    names = {f.name for f in dataclasses.fields(output_cls)}
    return next(name for name in CACHE_ARG_NAMES if name in names)


def output_cache(output):
    """The cache an HF model call returned, whatever the release calls the field."""
    for name in CACHE_ARG_NAMES:
        if name in output:  # ModelOutput is a mapping of the fields that were set
            return output[name]
    return None
