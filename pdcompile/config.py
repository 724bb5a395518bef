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
    paged: KV cache as a pool of ``block_size``-token blocks (the paged_kv pass) instead
        of one contiguous cache per call.
    prefix_cache: reuse the pool's blocks of an identical prompt prefix (paged only).
    kv_cache_memory / kv_cache_blocks: pool size; by default enough for
        max_batch_size full-length sequences, capped at 512 MiB.
    """

    max_batch_size: int = 8
    max_seq_len: int | None = None
    paged: bool = True
    block_size: int = 16
    prefix_cache: bool = True
    kv_cache_memory: int | None = None  # bytes for the paged pool; None: see default_pool_blocks
    kv_cache_blocks: int | None = None  # or the pool size in blocks

    def __post_init__(self):
        if not isinstance(self.max_batch_size, int) or self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be a positive int, got {self.max_batch_size!r}")
        if self.max_seq_len is not None and (not isinstance(self.max_seq_len, int) or self.max_seq_len < 2):
            raise ValueError(f"max_seq_len must be an int >= 2, got {self.max_seq_len!r}")
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {self.block_size!r}")
        if self.kv_cache_blocks is not None and self.kv_cache_blocks < 2:
            raise ValueError(f"kv_cache_blocks must be >= 2 (one block is scratch), got {self.kv_cache_blocks}")


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
    # the backend's own frozen options (e.g. backends.onnxruntime.OrtOptions); None: its defaults
    backend_options: object | None = None
