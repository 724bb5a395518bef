"""Host memory: what ``optimize()`` will need, checked before any work starts, and RSS readings.

The model's weights are already in memory when ``optimize()`` is called; what it adds is
each backend's own state (:data:`BACKEND_GROWTH`, measured, see BENCHMARKS.md "Model size")
plus the paged KV pool. :func:`check_fits` compares that with the memory the machine has
available and raises :class:`InsufficientMemoryError` naming both numbers and what to change,
before the capture begins. ``PDCOMPILE_SKIP_MEMORY_CHECK=1`` skips the refusal (with a warning).

Only CPU models are checked: on a GPU the weights and the KV pool live in device memory,
which these factors were not measured for.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

SKIP_ENV = "PDCOMPILE_SKIP_MEMORY_CHECK"
GB = 1e9

# Peak RSS growth of optimize() as (x weight bytes, fixed bytes), measured on the random
# Qwen2.5 sizes and R1 (BENCHMARKS.md, "Model size"), rounded up. The fixed part is the
# exporters' and compilers' own state (and, for ONNX, importing onnx/onnxscript); it hardly
# depends on the model. ONNX Runtime's part proportional to the weights is its pre-packed
# copy of the matmul weights: per session that pre-packs (OrtOptions.prepack).
BACKEND_GROWTH = {
    "eager": (0.1, 0.3e9),
    "inductor": (0.25, 0.8e9),
    "onnxruntime": (0.1, 0.6e9),  # + 1.0 x weights per pre-packing session (OrtBackend.prepacked_copies)
    "tensorrt": (0.25, 0.8e9),  # not measured (no TensorRT here): inductor's, the nearest lowering
}
MARGIN = 1.15  # the measurements vary by a few percent run to run


class InsufficientMemoryError(MemoryError):
    """optimize() would need more memory than the machine has available; the message says
    how much each part needs and what to change."""


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers, each storage counted once (tied weights)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.untyped_storage().data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def available_bytes() -> tuple[int, str]:
    """(bytes the process can still take, where the number comes from).

    The machine's MemAvailable (psutil, else /proc/meminfo), lowered to what the process's
    cgroup (a container's memory limit) still allows.
    """
    try:
        import psutil

        avail, source = int(psutil.virtual_memory().available), "available system memory"
    except ImportError:
        avail, source = None, ""
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        avail, source = int(line.split()[1]) * 1024, "MemAvailable in /proc/meminfo"
        except OSError:
            pass
        if avail is None:
            return 1 << 62, "unknown (no psutil, no /proc/meminfo)"
    limit = _cgroup_room()
    if limit is not None and limit < avail:
        return limit, "the memory limit of this process's cgroup (container)"
    return avail, source


def _cgroup_room() -> int | None:
    try:
        with open("/proc/self/cgroup") as f:
            path = next((line.strip().split(":", 2)[2] for line in f if line.startswith("0::")), None)
        if path is None:
            return None
        folder = "/sys/fs/cgroup" + path
        with open(os.path.join(folder, "memory.max")) as f:
            limit = f.read().strip()
        if limit == "max":
            return None
        with open(os.path.join(folder, "memory.current")) as f:
            return int(limit) - int(f.read())
    except (OSError, ValueError, StopIteration):
        return None


@dataclass(frozen=True)
class MemoryEstimate:
    """What optimize() adds to the process, by part (bytes)."""

    backend: str
    weights: int  # already in memory: not part of the total
    lowering: int  # the backend's state beyond its pre-packed weights
    prepacked: int  # ONNX Runtime's own copies of the matmul weights
    kv_pool: int

    @property
    def total(self) -> int:
        return self.lowering + self.prepacked + self.kv_pool

    def describe(self) -> str:
        parts = [f"{self.backend} lowering {self.lowering / GB:.1f} GB"]
        if self.prepacked:
            parts.append(f"ONNX Runtime's pre-packed matmul weights {self.prepacked / GB:.1f} GB")
        parts.append(f"paged KV pool {self.kv_pool / GB:.1f} GB")
        return ", ".join(parts)


def estimate(model, backend: str, kv_pool: int, prepacked_copies: int = 0) -> MemoryEstimate:
    """``prepacked_copies``: how many copies of the weights the backend keeps of its own."""
    weights = weight_bytes(model)
    factor, fixed = BACKEND_GROWTH.get(backend, BACKEND_GROWTH["inductor"])
    lowering = int((factor * weights + fixed) * MARGIN)
    prepacked = int(prepacked_copies * weights * MARGIN)
    return MemoryEstimate(backend, weights, lowering, prepacked, kv_pool)


def config_geometry(model):
    """The KV-cache geometry read off the model's config (the capture probes it later), or
    ``None`` when the config does not say (then the KV pool is left out of the estimate)."""
    from .capture import CacheGeometry, LayerGeometry

    config = model.config
    config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    try:
        layers = int(config.num_hidden_layers)
        heads = int(config.num_attention_heads)
        kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    except (AttributeError, TypeError, ValueError):
        return None
    dtype = next(model.parameters()).dtype
    return CacheGeometry(layers=(LayerGeometry(kv_heads, head_dim, head_dim),) * layers, dtype=dtype)


def check_fits(est: MemoryEstimate, device: torch.device) -> None:
    """Raise :class:`InsufficientMemoryError` if ``est`` does not fit the available memory."""
    if device.type != "cpu":
        return
    avail, source = available_bytes()
    logger.info("memory: optimize() needs about %.1f GB (%s) beyond the %.1f GB of weights; %.1f GB available",
                est.total / GB, est.describe(), est.weights / GB, avail / GB)
    if est.total <= avail:
        return
    message = (
        f"optimize() on the {est.backend} backend needs about {est.total / GB:.1f} GB of memory beyond the "
        f"{est.weights / GB:.1f} GB of weights already loaded ({est.describe()}), but only {avail / GB:.1f} GB "
        f"is available ({source}). To fit: a smaller KV pool (kv_cache_memory=, or a smaller max_seq_len / "
        f"max_batch_size); bf16 weights (model.to(torch.bfloat16): half the bytes); "
        + ("OrtOptions(prepack='none') (saves the pre-packed copy, slower decode); " if est.prepacked else "")
        + "or the eager backend, which adds the least. Set "
        f"{SKIP_ENV}=1 to try anyway."
    )
    if os.environ.get(SKIP_ENV, "") not in ("", "0"):
        logger.warning("%s (%s is set: going on)", message, SKIP_ENV)
        return
    raise InsufficientMemoryError(message)


# --------------------------------------------------------------------------- RSS readings


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def rss_bytes() -> int:
    """The process's resident memory now (Linux)."""
    return _status("VmRSS")


def peak_rss_bytes() -> int:
    """The process's peak resident memory since start or the last :func:`reset_peak_rss` (Linux)."""
    return _status("VmHWM")


def reset_peak_rss() -> None:
    """Start a new peak-RSS measurement from the current RSS (Linux >= 4.0: clear_refs 5)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
