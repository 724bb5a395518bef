"""The persistent compile cache: ``optimize()`` of a model it has compiled before loads the engines.

Each entry is a bundle (bundle.py: written in a temporary folder and renamed into place,
sha256 of every file, read back with all of ``load()``'s checks) under
``$PDCOMPILE_CACHE_DIR`` (default ``~/.cache/pdcompile``)::

    <dir>/entries/<key>/     one bundle per key (prefill, decode, extend engines)

The key is the sha256 of everything that changes the engines (:func:`cache_key`):

* the weights: every tensor of the state dict (name, dtype, shape and bytes), hashed in
  full. Sampling would be faster, but a fine-tune that changes a few rows (a LoRA merge
  into some layers, a new token's embedding) must miss, and only a full hash guarantees
  it; sha256 reads ~1-2 GB/s, about 0.3 s for SmolLM2-135M fp32, against minutes of
  compiling.
* the model's class and config (JSON), the device;
* the resolved pdcompile configuration (backend, backend options, cache config, disabled
  passes, max_seq_len) and each phase's pass list;
* the versions of pdcompile, torch, transformers, onnx/onnxruntime/torch_tensorrt, the
  bundle format, and a digest of pdcompile's own source files (a pass edited in a
  checkout without a version bump must miss too).

An entry that fails its checks on load (truncated, modified, from another version) is
deleted and rebuilt with a warning, never used. The cache is bounded: after each write the
least recently used entries (an entry's folder time is touched on every hit) are deleted
until the total is under ``PDCOMPILE_CACHE_SIZE`` (bytes, or with a K/M/G suffix;
default 10G). Backends without an engine file format (eager), and tensorrt (its saved engine
is a whole-phase conversion, stricter than what lower() runs), are not cached.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

DEFAULT_SIZE = 10 << 30
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_KEY = re.compile(r"[0-9a-f]{64}")


def cache_dir() -> Path:
    """``$PDCOMPILE_CACHE_DIR``, or ``~/.cache/pdcompile``."""
    return Path(os.environ.get("PDCOMPILE_CACHE_DIR") or Path.home() / ".cache" / "pdcompile")


def parse_size(text: str) -> int:
    """Bytes from "123", "500M", "10G" (binary units)."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]?)i?B?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ValueError(f"PDCOMPILE_CACHE_SIZE={text!r}: expected bytes, or a number with K, M, G or T (e.g. 10G)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def size_limit() -> int:
    env = os.environ.get("PDCOMPILE_CACHE_SIZE")
    return parse_size(env) if env else DEFAULT_SIZE


# ---------------------------------------------------------------------------- the key

def weights_digest(model: torch.nn.Module) -> str:
    """sha256 over every state-dict tensor's name, dtype, shape and bytes (see the module docstring)."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        if t.numel():
            # bytes as they are (bf16 has no numpy dtype: viewed as uint8)
            h.update(memoryview(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


def source_digest() -> str:
    """sha256 of pdcompile's own .py files (what a checkout edits without bumping the version)."""
    root = Path(__file__).parent
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def canonical(obj):
    """``obj`` as JSON-able data that is the same in every process (sets sorted, dataclasses
    by field with their type's name): ``repr`` of a frozenset depends on the hash seed."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {"__type__": type(obj).__qualname__,
                **{f.name: canonical(getattr(obj, f.name)) for f in dataclasses.fields(obj)}}
    if isinstance(obj, (set, frozenset)):
        return sorted(canonical(x) for x in obj)
    if isinstance(obj, (list, tuple)):
        return [canonical(x) for x in obj]
    if isinstance(obj, dict):
        return {str(k): canonical(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, enum.Enum):
        return obj.value
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return repr(obj)  # torch.dtype, torch.device, ...


def model_config_dict(config) -> dict:
    d = config.to_dict()
    # where it was loaded from and who wrote the file do not change the graphs
    for k in ("_name_or_path", "transformers_version"):
        d.pop(k, None)
    return d


def versions() -> dict:
    from .bundle import _versions
    from .manifest import FORMAT_VERSION

    return {**_versions(), "bundle_format": str(FORMAT_VERSION), "pdcompile_source": source_digest()}


def key_components(model, config, seq_len: int, backend: str, device, pipelines: dict) -> dict:
    """What the key hashes, by name (also written next to nothing: the key alone names an entry)."""
    return {
        "weights": weights_digest(model),
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "model_config": model_config_dict(model.config),
        "device": str(device),
        "backend": backend,
        "max_seq_len": seq_len,
        "optimize_config": canonical(config),
        "passes": {phase: [p.name for p in pipeline] for phase, pipeline in sorted(pipelines.items())},
        "versions": versions(),
    }


def cache_key(components: dict) -> str:
    return hashlib.sha256(json.dumps(canonical(components), sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------------------- the store

@dataclass(frozen=True)
class Entry:
    key: str
    path: Path
    bytes: int
    last_used: float  # the folder's mtime: touched on every hit
    backend: str | None
    model: str | None


def _tree_bytes(path: Path) -> int:
    total = 0
    for root, _, names in os.walk(path):
        for n in names:
            try:
                total += os.lstat(os.path.join(root, n)).st_size
            except OSError:
                pass
    return total


class CompileCache:
    """The entries under one folder. Safe for processes sharing it: entries appear by
    rename and go by rename-then-delete, so a reader sees a whole entry or none (or a
    failing check, which it treats as a miss)."""

    def __init__(self, root: Path | str | None = None, limit: int | None = None):
        self.root = Path(root) if root is not None else cache_dir()
        self.limit = size_limit() if limit is None else limit
        self.entries_dir = self.root / "entries"

    def path(self, key: str) -> Path:
        return self.entries_dir / key

    def staging(self, key: str) -> Path:
        """A hidden work folder next to the entry, named as bundle.export names its own (so that
        one an interrupted build left behind is cleaned up by the next write of that key)."""
        from .bundle import TMP_SUFFIX, _clean_interrupted

        self.entries_dir.mkdir(parents=True, exist_ok=True)
        _clean_interrupted(self.path(key))
        tmp = self.entries_dir / f".{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}{TMP_SUFFIX}"
        tmp.mkdir()
        return tmp

    def lookup(self, key: str) -> Path | None:
        path = self.path(key)
        if not path.is_dir():
            return None
        try:
            os.utime(path)  # least recently used = oldest folder time
        except OSError:
            pass
        return path

    def publish(self, tmp: Path, key: str) -> Path:
        """Rename the finished bundle ``tmp`` into place, then evict down to the size limit."""
        path = self.path(key)
        try:
            tmp.rename(path)
        except OSError:  # another process published the same key first: theirs is as good
            shutil.rmtree(tmp, ignore_errors=True)
            logger.debug("compile cache: %s was written by another process meanwhile", key[:12])
        self.evict(keep=key)
        return path

    def remove(self, key: str) -> None:
        path = self.path(key)
        if not path.exists():
            return
        gone = self.entries_dir / f".{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}.pdc-old"
        try:
            path.rename(gone)
        except OSError:
            return
        shutil.rmtree(gone, ignore_errors=True)

    def entries(self) -> list[Entry]:
        """Every entry, least recently used first."""
        if not self.entries_dir.is_dir():
            return []
        out = []
        for p in self.entries_dir.iterdir():
            if not _KEY.fullmatch(p.name) or not p.is_dir() or p.is_symlink():
                continue
            backend = model = None
            try:
                manifest = json.loads((p / "manifest.json").read_text())
                backend = manifest.get("backend")
                model = (manifest.get("model") or {}).get("architecture") or manifest["model"].get("model_type")
            except (OSError, ValueError, AttributeError):
                pass
            try:
                out.append(Entry(p.name, p, _tree_bytes(p), p.stat().st_mtime, backend, model))
            except OSError:  # removed meanwhile
                pass
        return sorted(out, key=lambda e: e.last_used)

    def total_bytes(self) -> int:
        return sum(e.bytes for e in self.entries())

    def evict(self, keep: str | None = None) -> list[str]:
        """Delete least recently used entries until the total is within the limit; ``keep`` last."""
        entries = self.entries()
        total = sum(e.bytes for e in entries)
        removed = []
        for e in sorted(entries, key=lambda e: (e.key == keep, e.last_used)):
            if total <= self.limit:
                break
            if e.key == keep:
                logger.warning("compile cache: this entry alone (%.1f MB) exceeds the cache size limit (%.1f MB, "
                               "PDCOMPILE_CACHE_SIZE): not kept", e.bytes / 1e6, self.limit / 1e6)
            else:
                logger.info("compile cache: evicting %s (%.1f MB, least recently used)", e.key[:12], e.bytes / 1e6)
            self.remove(e.key)
            total -= e.bytes
            removed.append(e.key)
        return removed

    def clear(self) -> int:
        """Delete every entry (and work folders of no running process); returns how many entries."""
        entries = self.entries()
        for e in entries:
            self.remove(e.key)
        return len(entries)


def describe(entries: list[Entry]) -> list[str]:
    lines = []
    for e in entries:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.last_used))
        lines.append(f"{e.key[:16]}  {e.bytes / 1e6:9.1f} MB  {when}  {e.backend or '?':12s} {e.model or '?'}")
    return lines
