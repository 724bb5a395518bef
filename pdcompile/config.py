"""Frozen configuration objects, one per concern."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class CacheConfig:
    """Capacity of the compiled model.

    max_batch_size: most sequences in one generate()/forward() call.
    max_seq_len: most tokens (prompt + generated) per sequence; ``None`` takes the
        model's own limit (``max_position_embeddings``, and the sliding window where the
        model has one, see :func:`pdcompile.api.default_max_seq_len`).
    """

    max_batch_size: int = 8
    max_seq_len: int | None = None

    def __post_init__(self):
        if not isinstance(self.max_batch_size, int) or self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be a positive int, got {self.max_batch_size!r}")
        if self.max_seq_len is not None and (not isinstance(self.max_seq_len, int) or self.max_seq_len < 2):
            raise ValueError(f"max_seq_len must be an int >= 2, got {self.max_seq_len!r}")


@dataclass(frozen=True)
class PassConfig:
    """Which graph passes run. Names are those of :mod:`pdcompile.passes` pipelines."""

    disabled: frozenset[str] = field(default_factory=frozenset)

    def enabled(self, name: str) -> bool:
        return name not in self.disabled


@dataclass(frozen=True)
class OptimizeConfig:
    """Everything :func:`pdcompile.optimize` needs besides the model."""

    backend: str | None = None  # None: the default backend for the model's device
    cache: CacheConfig = field(default_factory=CacheConfig)
    passes: PassConfig = field(default_factory=PassConfig)
