"""Export / load: the compiled phases as a folder that loads without the HF model.

A bundle is a folder::

    manifest.json            format version, versions, backend, cache geometry, limits,
                             phase signatures, the pass report, sha256 of every file
    config.json              the HF model config (JSON)
    generation_config.json   the HF generation config (JSON)
    tokenizer files          when a tokenizer was given or found next to the model
    prefill.* / decode.*     the engines: .onnx (onnxruntime), .pt2 (inductor AOT
                             package), .engine (tensorrt)

Loading reads JSON, checks every hash, and hands engine files to their runtime. It
never unpickles: no ``pickle``, no ``torch.load``; configs come from JSON through
transformers' config classes (no remote code).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

import torch

from .backends import backend_class, exportable_backends
from .capture import CacheGeometry, LayerGeometry
from .config import CacheConfig, PassConfig
from .executor import StepExecutor
from .kv_cache import ContiguousKV, PagedKV
from .phase import PassContext, PhaseSignature
from .runtime import OptimizedModel, Runner

logger = logging.getLogger(__name__)

FORMAT = "pdcompile-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"

class BundleError(ValueError):
    """A bundle is missing, corrupted, or was made by an incompatible version."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _versions() -> dict:
    from . import __version__

    out = {"pdcompile": __version__, "torch": torch.__version__}
    for mod in ("transformers", "onnxruntime", "onnx", "torch_tensorrt"):
        try:
            out[mod] = importlib.import_module(mod).__version__
        except ImportError:
            pass
    return out


def _backend(name: str, options=None):
    """The backend that writes / reads this bundle's engines (one registry: pdcompile.backends)."""
    backend = backend_class(name)
    if not backend.exportable:
        raise ValueError(
            f"backend {name!r} cannot be exported: engines exist for {', '.join(exportable_backends())} "
            "(the eager backend runs Python graphs and has no engine file)"
        )
    return backend(options)


def export(model, path, backend: str = "onnxruntime", tokenizer=None, overwrite: bool = False) -> Path:
    """Write ``model`` (an :class:`OptimizedModel` from ``optimize()``) as a bundle at ``path``.

    The phases are lowered again for ``backend`` from the transformed graphs the model
    keeps, whatever backend it runs in process.
    """
    if not isinstance(model, OptimizedModel) or model.graphs is None:
        raise TypeError("export() takes the model returned by pdcompile.optimize() (it keeps the transformed graphs)")
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    runner = model.runner
    options = None
    if backend == "tensorrt" and runner.paged:  # the engine's profile fixes the pool the runtime allocated
        from .backends.tensorrt import TensorRTOptions

        options = TensorRTOptions(pool_blocks=runner.kv.pool.num_blocks)
    engine = _backend(backend, options)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}-"))
    try:
        phases = {}
        for phase in ("prefill", "decode"):
            t0 = time.perf_counter()
            logger.info("export: lowering %s for %s ...", phase, backend)
            graph = model.graphs[phase]
            entry = engine.save(graph.gm, graph.ctx, tmp)
            entry["signature"] = graph.ctx.signature.to_dict()
            phases[phase] = entry
            logger.info("export: %s written in %.1f s", phase, time.perf_counter() - t0)
        model.config.to_json_file(tmp / "config.json")
        model.generation_config.to_json_file(tmp / "generation_config.json")
        tokenizer = tokenizer or _find_tokenizer(model)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "versions": _versions(),
            "backend": backend,
            "device": str(runner.device),
            "model": {"architecture": (model.config.architectures or [None])[0], "model_type": model.config.model_type},
            "limits": {"max_batch_size": runner.max_batch_size, "max_seq_len": runner.max_seq_len,
                       "vocab_size": runner.vocab_size},
            "cache": {"dtype": str(runner.geometry.dtype).replace("torch.", ""),
                      "layers": [vars(g) for g in runner.geometry.layers],
                      "paged": runner.paged, "block_size": getattr(runner.kv, "block_size", None)},
            "phases": phases,
            "report": model.pdcompile_report().to_dict() if model.pdcompile_report() else None,
            "files": {},
        }
        for f in sorted(p for p in tmp.rglob("*") if p.is_file()):
            rel = f.relative_to(tmp).as_posix()
            manifest["files"][rel] = {"sha256": _sha256(f), "bytes": f.stat().st_size}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("export: bundle written to %s", path)
    return path


def _find_tokenizer(model):
    src = getattr(model.config, "_name_or_path", None)
    if not src or not Path(src).is_dir():
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(src)
    except (OSError, ValueError):
        return None


def read_manifest(path) -> dict:
    path = Path(path)
    mf = path / MANIFEST
    if not mf.is_file():
        raise BundleError(f"{path} is not a pdcompile bundle: {MANIFEST} is missing")
    try:
        manifest = json.loads(mf.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{mf} is corrupted (not valid JSON: {e})") from e
    if manifest.get("format") != FORMAT:
        raise BundleError(f"{mf} is not a {FORMAT} manifest (format={manifest.get('format')!r})")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise BundleError(
            f"bundle format version {version} is newer than this pdcompile supports ({FORMAT_VERSION}); upgrade pdcompile"
        )
    return manifest


def verify(path, manifest: dict) -> None:
    """Every listed file present with its size and sha256; nothing unlisted among the engines."""
    path = Path(path)
    for rel, meta in manifest["files"].items():
        f = path / rel
        if not f.is_file():
            raise BundleError(f"bundle file {rel} is missing from {path}")
        if f.stat().st_size != meta["bytes"]:
            raise BundleError(f"bundle file {rel} has {f.stat().st_size} bytes, the manifest says {meta['bytes']}: corrupted")
        if _sha256(f) != meta["sha256"]:
            raise BundleError(f"bundle file {rel} does not match its sha256 in the manifest: corrupted or modified")


def _check_versions(manifest: dict) -> None:
    built = manifest["versions"].get("torch", "")
    if manifest["backend"] == "inductor" and built.split("+")[0].split(".")[:2] != torch.__version__.split("+")[0].split(".")[:2]:
        raise BundleError(
            f"this inductor bundle was compiled with torch {built}; AOTInductor packages only load in the same "
            f"torch minor version (this is torch {torch.__version__})"
        )


def load(path, device: str | torch.device | None = None, kv_cache_memory: int | None = None) -> OptimizedModel:
    """Load a bundle written by :func:`export` as an :class:`OptimizedModel`.

    Bundles carry the prefill and decode engines; prefix caching (which needs the extend
    graph) is off for a loaded model. ``kv_cache_memory`` sizes the paged KV pool.
    """
    from transformers import AutoConfig, GenerationConfig

    path = Path(path)
    manifest = read_manifest(path)
    verify(path, manifest)
    _check_versions(manifest)
    backend = manifest["backend"]
    engine = _backend(backend)
    device = torch.device(device or manifest.get("device", "cpu"))
    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    gen_config = GenerationConfig.from_pretrained(path)
    cache = manifest["cache"]
    geometry = CacheGeometry(
        layers=tuple(LayerGeometry(**g) for g in cache["layers"]), dtype=getattr(torch, cache["dtype"])
    )
    limits = manifest["limits"]
    cc = CacheConfig(max_batch_size=limits["max_batch_size"], max_seq_len=limits["max_seq_len"],
                     paged=bool(cache.get("paged")), block_size=cache.get("block_size") or 16,
                     prefix_cache=False, kv_cache_memory=kv_cache_memory)
    phases = {}
    for p in ("prefill", "decode"):
        entry = manifest["phases"][p]
        ctx = PassContext(phase=p, signature=PhaseSignature.from_dict(entry["signature"]), cache=cc,
                          passes=PassConfig(), device=device)
        phases[p] = (engine.load(path, entry, ctx), ctx.signature)
    if cc.paged:
        from .api import default_pool_blocks

        kv = PagedKV(geometry, device, cc.max_seq_len, block_size=cc.block_size, prefix_cache=False,
                     num_blocks=default_pool_blocks(geometry, cc, cc.max_seq_len))
    else:
        kv = ContiguousKV(geometry, device, cc.max_seq_len)
    runner = Runner(kv, StepExecutor(phases), cc.max_batch_size, limits["vocab_size"])
    from .report import OptimizeReport

    report = OptimizeReport.from_dict(manifest["report"]) if manifest.get("report") else OptimizeReport(backend)
    return OptimizedModel(runner, config, gen_config, original_model=None, report=report, backend=backend)
