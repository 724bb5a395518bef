"""``pdcompile.optimize``: capture, pass pipelines, lowering, runtime."""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass

import torch

from . import capture as capture_mod
from . import memory
from .backends import default_backend, get_backend
from .config import CacheConfig, OptimizeConfig, PassConfig
from .executor import StepExecutor
from .kv_cache import ContiguousKV, PagedKV
from .passes import DECODE_PIPELINE, EXTEND_PIPELINE, PREFILL_PIPELINE, SCORE_PIPELINE, paged_kv, run_pipeline
from .phase import PassContext
from .report import OptimizeReport
from .runtime import OptimizedModel, Runner

logger = logging.getLogger(__name__)


def default_max_seq_len(config) -> int:
    """The model's own limit: its position table (a sliding window does not limit it:
    sliding layers attend to the last ``window`` positions, see capture.SlidingLayout)."""
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 2048
    return int(limit)


def _resolve_config(model, config: OptimizeConfig | None, backend, max_batch_size, max_seq_len, disable_passes,
                    **cache_options):
    if config is None:
        config = OptimizeConfig(
            backend=backend,
            cache=CacheConfig(max_batch_size=max_batch_size, max_seq_len=max_seq_len, **cache_options),
            passes=PassConfig(disabled=frozenset(disable_passes)),
        )
    model_limit = default_max_seq_len(model.config)
    seq = config.cache.max_seq_len
    if seq is None:
        seq = model_limit
    elif seq > model_limit:
        raise ValueError(
            f"max_seq_len={seq} exceeds what {type(model).__name__} supports ({model_limit}: "
            "max_position_embeddings of its config)"
        )
    # paging is one switch: the pass and the runner must agree
    passes = config.passes
    if not config.cache.paged and passes.enabled(paged_kv.NAME):
        passes = PassConfig(disabled=passes.disabled | {paged_kv.NAME})
    elif config.cache.paged and not passes.enabled(paged_kv.NAME):
        config = dataclasses.replace(config, cache=dataclasses.replace(config.cache, paged=False))
    config = dataclasses.replace(config, passes=passes)
    return config, seq


PIPELINES = {"prefill": PREFILL_PIPELINE, "decode": DECODE_PIPELINE, "extend": EXTEND_PIPELINE, "score": SCORE_PIPELINE}


def default_pool_blocks(geometry, cache: CacheConfig, seq_len: int) -> int:
    """Pool size: kv_cache_blocks, or kv_cache_memory, or max_batch_size full sequences (<= 512 MiB)."""
    if cache.kv_cache_blocks:
        return cache.kv_cache_blocks
    per_block = geometry.bytes_per_token() * cache.block_size
    budget = cache.kv_cache_memory
    if budget is None:
        full = cache.max_batch_size * -(-seq_len // cache.block_size) * per_block
        budget = min(full, 512 << 20)
    return max(2, budget // per_block + 1)


def check_memory(model, config: OptimizeConfig, seq_len: int, backend_name: str, lowering, device) -> None:
    """Refuse, before any work, a model whose optimize() would not fit in memory (see memory.py)."""
    kv_pool = 0
    geometry = memory.config_geometry(model)
    if config.cache.paged and geometry is not None:
        per_block = geometry.bytes_per_token() * config.cache.block_size
        kv_pool = default_pool_blocks(geometry, config.cache, seq_len) * per_block
    prepacked = getattr(lowering, "prepacked_copies", None)
    dtype = next(model.parameters()).dtype
    est = memory.estimate(model, backend_name, kv_pool, prepacked(dtype, device) if prepacked else 0)
    memory.check_fits(est, device)


class _Stage:
    """Logs a stage of optimize() with its duration and records it."""

    def __init__(self, name: str, timings: dict):
        self.name, self.timings = name, timings

    def __enter__(self):
        logger.info("%s ...", self.name)
        self.t0 = time.perf_counter()

    def __exit__(self, *exc):
        dt = time.perf_counter() - self.t0
        self.timings[self.name] = dt
        if exc[0] is None:
            logger.info("%s done in %.1f s", self.name, dt)


@dataclass(frozen=True)
class PhaseGraph:
    """A transformed phase graph and the context it was transformed in (signature included)."""

    gm: torch.fx.GraphModule
    ctx: PassContext


def transform(model, config: OptimizeConfig, seq_len: int, timings: dict, attn_implementation: str = "sdpa"):
    """Capture + pass pipelines, no compilation: (captured model, {phase: PhaseGraph}, report, config)."""
    with _Stage("capture", timings):
        captured = capture_mod.capture(model, config.cache.max_batch_size, seq_len, attn_implementation)
    report = OptimizeReport(backend=config.backend or "", timings=timings)
    device = next(model.parameters()).device
    graphs = {}
    for phase, (gm, signature) in captured.graphs.items():
        with _Stage(f"passes[{phase}]", timings):
            graphs[phase], report.phases[phase] = run_phase_pipeline(gm, signature, config, seq_len, device)
    if config.cache.paged and not all(g.ctx.signature.is_paged for g in graphs.values()):
        reason = next(r.detail for recs in report.phases.values() for r in recs if r.name == paged_kv.NAME and not r.matches)
        logger.warning("paged KV cache not applicable to this model (%s): using contiguous caches", reason)
        config = dataclasses.replace(config, cache=dataclasses.replace(config.cache, paged=False),
                                     passes=PassConfig(disabled=config.passes.disabled | {paged_kv.NAME}))
        return transform(model, config, seq_len, timings, attn_implementation)
    return captured, graphs, report, config


def run_phase_pipeline(gm, signature, config: OptimizeConfig, seq_len: int, device) -> tuple[PhaseGraph, list]:
    """The phase's pipeline over ``gm``; returns the graph with its final context, and the pass records."""
    ctx = PassContext(phase=signature.phase, signature=signature,
                      cache=dataclasses.replace(config.cache, max_seq_len=seq_len), passes=config.passes,
                      device=device)
    gm, records, ctx = run_pipeline(gm, PIPELINES[signature.phase], ctx)
    return PhaseGraph(gm, ctx), records


def optimize(
    model,
    backend: str | None = None,
    *,
    max_batch_size: int = 8,
    max_seq_len: int | None = None,
    disable_passes=(),
    paged: bool = True,
    block_size: int = 16,
    prefix_cache: bool = True,
    kv_cache_memory: int | None = None,
    config: OptimizeConfig | None = None,
) -> OptimizedModel:
    """Capture ``model`` as prefill and decode graphs, transform and compile them.

    Args:
        model: a transformers causal LM (``AutoModelForCausalLM``), decoder-only.
        backend: "eager" (the reference), "inductor", "onnxruntime", "tensorrt";
            ``None`` picks the default for the model's device.
        max_batch_size / max_seq_len: the capacity; requests beyond it raise.
        disable_passes: names of graph passes to skip (see ``pdcompile.passes``).
        paged: KV cache as a shared pool of ``block_size``-token blocks (default) or one
            contiguous cache per call.
        block_size: tokens per KV block of the paged pool (16).
        prefix_cache: reuse cached blocks of a repeated prompt prefix (paged only).
        kv_cache_memory: bytes for the paged pool (default: enough for max_batch_size
            full-length sequences, at most 512 MiB).
        config: an :class:`OptimizeConfig` instead of the keyword arguments (block size,
            pool size in blocks, backend options).

    Returns an :class:`OptimizedModel` with the HF model's generate()/forward().
    """
    capture_mod.check_supported(model)  # before anything reads model.config: one clear refusal
    config, seq_len = _resolve_config(model, config, backend, max_batch_size, max_seq_len, disable_passes,
                                      paged=paged, block_size=block_size, prefix_cache=prefix_cache,
                                      kv_cache_memory=kv_cache_memory)
    device = next(model.parameters()).device
    backend_name = config.backend or default_backend(device)
    lowering = get_backend(backend_name, config.backend_options)
    check_memory(model, config, seq_len, backend_name, lowering, device)
    timings: dict[str, float] = {}
    t_start = time.perf_counter()
    captured, graphs, report, config = transform(model, config, seq_len, timings)
    report.backend = backend_name
    pool_blocks = default_pool_blocks(captured.geometry, config.cache, seq_len) if config.cache.paged else None
    # Serially: lowering is Python-bound tracing (one core each), and a forked child to
    # lower a phase in parallel cannot work once CUDA is initialised and is fragile next
    # to threads; measured on 2 cores, see BENCHMARKS.md.
    phases = {}
    for phase, g in graphs.items():
        with _Stage(f"compile[{backend_name}:{phase}]", timings):
            phases[phase] = (lowering.lower(g.gm, g.ctx), g.ctx.signature)

    def lazy(phase):
        def build():
            gm, signature = capture_mod.capture_phase(model, phase, config.cache.max_batch_size, seq_len,
                                                      captured.geometry)
            graphs[phase], report.phases[phase] = run_phase_pipeline(gm, signature, config, seq_len, device)
            return lowering.lower(graphs[phase].gm, graphs[phase].ctx), graphs[phase].ctx.signature
        return build

    timings["total"] = time.perf_counter() - t_start
    logger.info("optimize: %s backend ready in %.1f s", backend_name, timings["total"])
    vocab = model.get_input_embeddings().weight.shape[0]
    executor = StepExecutor(phases, lazy={"score": lazy("score"), "extend": lazy("extend")})
    if config.cache.paged:
        kv = PagedKV(captured.geometry, device, seq_len, num_blocks=pool_blocks, block_size=config.cache.block_size,
                     prefix_cache=config.cache.prefix_cache)
    else:
        kv = ContiguousKV(captured.geometry, device, seq_len)
    return OptimizedModel(
        Runner(kv, executor, config.cache.max_batch_size, vocab), model.config, model.generation_config,
        original_model=model, report=report, backend=backend_name, graphs=graphs,
    )
