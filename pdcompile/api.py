"""``pdcompile.optimize``: capture, pass pipelines, lowering, runtime."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
from dataclasses import dataclass

import torch

from . import capture as capture_mod
from . import compile_cache, memory
from .backends import backend_class, default_backend, get_backend
from .backends.ort_layers import RepeatError
from .config import CacheConfig, OptimizeConfig, PassConfig, QuantConfig
from .executor import StepExecutor
from .kv_cache import ContiguousKV, PagedKV
from .passes import (DECODE_PIPELINE, EXTEND_PIPELINE, PREFILL_PIPELINE, SCORE_PIPELINE, bf16_matmuls, paged_kv,
                     run_pipeline)
from .phase import PHASES, PassContext
from .report import OptimizeReport
from .runtime import OptimizedModel, Runner

logger = logging.getLogger(__name__)


def default_max_seq_len(config) -> int:
    """The model's own limit: its position table (a sliding window does not limit it:
    sliding layers attend to the last ``window`` positions, see capture.SlidingLayout)."""
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 2048
    return int(limit)


def _resolve_config(model, config: OptimizeConfig | None, backend, max_batch_size, max_seq_len, disable_passes,
                    weights=None, prefill_dtype="float32", **cache_options):
    if config is None:
        config = OptimizeConfig(
            backend=backend,
            cache=CacheConfig(max_batch_size=max_batch_size, max_seq_len=max_seq_len, **cache_options),
            passes=PassConfig(disabled=frozenset(disable_passes)),
            quant=QuantConfig.parse(weights),
            prefill_dtype=prefill_dtype,
        )
    elif weights is not None:
        raise ValueError("pass weights= or config=OptimizeConfig(quant=QuantConfig(...)), not both")
    elif OptimizeConfig(prefill_dtype=prefill_dtype).prefill_dtype != "float32":
        raise ValueError("pass prefill_dtype= or config=OptimizeConfig(prefill_dtype=...), not both")
    if config.prefill_dtype == "bfloat16" and config.quant is not None and config.quant.prefill != "dequantized":
        raise ValueError(f"prefill_dtype='bfloat16' converts float32 linear layers; with weights={config.quant.bits}-bit "
                         f"prefill runs the quantized kernels (QuantConfig.prefill='quantized'). Pass "
                         f"weights='int{config.quant.bits}:prefill=dequantized' for bf16 products on the "
                         f"dequantized weights, or leave prefill_dtype at float32")
    if config.prefill_dtype == "bfloat16":
        ok, found = bf16_matmuls.bf16_supported(next(model.parameters()).device)
        if not ok:  # emulated bf16 products are slower than fp32 ones: the fp32 path, said once
            logger.warning("prefill_dtype='bfloat16' ignored: %s; prefill computes in float32", found)
            config = dataclasses.replace(config, prefill_dtype="float32")
        else:
            logger.info("prefill computes its linear layers in bfloat16 (%s)", found)
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
    copies = prepacked(dtype, device) if prepacked else 0
    if config.prefill_dtype == "bfloat16" and dtype == torch.float32:
        copies += 0.5  # bf16_matmuls: a bf16 copy of the linear layers, shared by the prefill-like phases
        if device.type == "cpu" and (backend_name == "eager" or not lowering.bf16_matmuls):
            copies += 0.5  # and the eager backend's oneDNN-reordered copy of it (backends/eager.py)
    est = memory.estimate(model, backend_name, kv_pool, copies)
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


def graph_phases(config: OptimizeConfig) -> tuple[str, ...]:
    """The phases optimize() builds. Extend too when prefix caching can use it: a prompt whose
    start is in the pool continues from there, and building that graph on the first such
    call would stall it for as long as a compile (minutes for SmolLM2). One graph for both
    (prefill as extend from position 0) would save that capture and lowering, but prefill
    would then attend through the pool over the whole reservation with an explicit mask
    instead of its fused causal attention: measured on R1, onnxruntime, 2 contended cores
    (benchmarks/extend_as_prefill.py), extend from 0 took x0.99 / x1.05 / x1.07 the prefill
    graph's time at 32 / 128 / 512 prompt tokens, growing with the prompt. TTFT is paid on
    every request and compile time once per model (the compile cache keeps the engines),
    so prefill keeps its graph."""
    if config.cache.paged and config.cache.prefix_cache:
        return ("prefill", "decode", "extend")
    return ("prefill", "decode")


def transform(model, config: OptimizeConfig, seq_len: int, timings: dict, attn_implementation: str = "sdpa",
              repeat_layers: bool = False):
    """Capture + pass pipelines, no compilation: (captured model, {phase: PhaseGraph}, report, config).

    ``repeat_layers``: capture a few decoder layers where the model allows it, for a backend
    that repeats one (Backend.repeats_layers); each graph's ``ctx.layers`` then says so."""
    with _Stage("capture", timings):
        captured = capture_mod.capture(model, config.cache.max_batch_size, seq_len, attn_implementation,
                                       phases=graph_phases(config), repeat_layers=repeat_layers)
    report = OptimizeReport(backend=config.backend or "", timings=timings)
    device = next(model.parameters()).device
    graphs = {}
    for phase, (gm, signature) in captured.graphs.items():
        with _Stage(f"passes[{phase}]", timings):
            graphs[phase], report.phases[phase] = run_phase_pipeline(gm, signature, config, seq_len, device,
                                                                     captured)
    if config.cache.paged and not all(g.ctx.signature.is_paged for g in graphs.values()):
        reason = next(r.detail for recs in report.phases.values() for r in recs if r.name == paged_kv.NAME and not r.matches)
        logger.warning("paged KV cache not applicable to this model (%s): using contiguous caches", reason)
        config = dataclasses.replace(config, cache=dataclasses.replace(config.cache, paged=False),
                                     passes=PassConfig(disabled=config.passes.disabled | {paged_kv.NAME}))
        return transform(model, config, seq_len, timings, attn_implementation, repeat_layers)
    return captured, graphs, report, config


def repeats_layers(config: OptimizeConfig, lowering) -> bool:
    """Whether optimize() captures a few layers and lets the backend repeat one: the backend
    can, and every phase runs on it (bf16 prefill phases run on the eager backend) with the
    model's own weights (quantized weights are the pass's tensors, not the layers')."""
    return (lowering.repeats_layers and getattr(lowering.options, "repeat_layers", True)
            and config.prefill_dtype == "float32" and config.quant is None)


def run_phase_pipeline(gm, signature, config: OptimizeConfig, seq_len: int, device,
                       captured: capture_mod.CapturedModel | None = None) -> tuple[PhaseGraph, list]:
    """The phase's pipeline over ``gm``; returns the graph with its final context, and the pass records."""
    bf16 = config.prefill_dtype == "bfloat16" and PHASES[signature.phase].query != 1  # prefill, extend, score
    ctx = PassContext(phase=signature.phase, signature=signature,
                      cache=dataclasses.replace(config.cache, max_seq_len=seq_len), passes=config.passes,
                      device=device, quant=config.quant, matmul_dtype=torch.bfloat16 if bf16 else None)
    gm, records, ctx = run_pipeline(gm, PIPELINES[signature.phase], ctx)
    if captured is not None and captured.layers is not None:  # the engine takes the whole model's inputs
        ctx = dataclasses.replace(ctx, layers=captured.layers.full(ctx.signature, captured.geometry))
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
    weights: str | QuantConfig | None = None,
    prefill_dtype: str = "float32",
    config: OptimizeConfig | None = None,
    cache=None,
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
        weights: "int8" / "int4" (weight-only, group-wise, see :class:`QuantConfig`), a
            :class:`QuantConfig`, or None (the model's weights as they are).
        prefill_dtype: "float32" (default) or "bfloat16": the dtype of prefill's linear
            layers (and the extend and score graphs'). bfloat16 makes prefill several times
            faster on CPUs with AVX-512 BF16 or AMX, at bf16 rounding of the products;
            elsewhere it is ignored with a warning. Decode is unchanged.
        config: an :class:`OptimizeConfig` instead of the keyword arguments (block size,
            pool size in blocks, backend options).
        cache: the persistent compile cache (see :mod:`pdcompile.compile_cache`): ``None``
            uses it unless ``PDCOMPILE_CACHE=0``; ``False`` compiles without it; a folder
            uses that one instead of ``PDCOMPILE_CACHE_DIR``.

    Returns an :class:`OptimizedModel` with the HF model's generate()/forward().
    """
    capture_mod.check_supported(model)  # before anything reads model.config: one clear refusal
    config, seq_len = _resolve_config(model, config, backend, max_batch_size, max_seq_len, disable_passes, weights,
                                      prefill_dtype=prefill_dtype, paged=paged, block_size=block_size,
                                      prefix_cache=prefix_cache, kv_cache_memory=kv_cache_memory)
    device = next(model.parameters()).device
    backend_name = config.backend or default_backend(device)
    lowering = get_backend(backend_name, config.backend_options)
    check_memory(model, config, seq_len, backend_name, lowering, device)
    timings: dict[str, float] = {}
    t_start = time.perf_counter()
    store = _compile_cache(cache, backend_name, model)
    if store is not None and config.prefill_dtype == "bfloat16" and not lowering.bf16_matmuls:
        logger.info("compile cache: not used: bf16 prefill runs on the eager backend next to %s engines, and "
                    "eager phases have no engine files", backend_name)
        store = None
    key = None
    if store is not None:
        with _Stage("cache key", timings):
            key = compile_cache.cache_key(compile_cache.key_components(model, config, seq_len, backend_name, device,
                                                                       PIPELINES))
        hit = _from_cache(store, key, model, config, lowering, device, timings, t_start)
        if hit is not None:
            return hit
    repeat = repeats_layers(config, lowering)
    captured, graphs, report, config = transform(model, config, seq_len, timings, repeat_layers=repeat)
    report.backend = backend_name
    folder = store.staging(key) if store is not None else None
    # Serially: lowering is Python-bound tracing (one core each), and a forked child to
    # lower a phase in parallel cannot work once CUDA is initialised and is fragile next
    # to threads; measured on 2 cores, see BENCHMARKS.md.
    phases, entries = {}, {}
    try:
        try:
            _lower_all(graphs, lowering, folder, phases, entries, timings)
        except RepeatError as e:  # the lowered layers differ: every layer, captured and lowered
            logger.info("lowering every layer: the repeated one does not match the others (%s)", e)
            phases.clear()
            entries.clear()
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)
                folder = store.staging(key)
            captured, graphs, report, config = transform(model, config, seq_len, timings)
            report.backend = backend_name
            _lower_all(graphs, lowering, folder, phases, entries, timings)

        score = _lazy_phase("score", model, config, seq_len, captured.geometry, lowering, graphs, report)
        optimized = _runtime(model, config, seq_len, captured.geometry, StepExecutor(phases, lazy={"score": score}),
                             report=report, backend=backend_name, graphs=graphs)
        if folder is not None:
            with _Stage("cache write", timings):
                from .bundle import write_manifest

                try:
                    write_manifest(optimized, folder, backend_name, entries)
                    store.publish(folder, key)
                except OSError as e:  # a full disk costs the next run a compile, not this one its model
                    logger.warning("compile cache: could not write the entry to %s (%s)", store.root, e)
    finally:
        if folder is not None and folder.exists():
            shutil.rmtree(folder, ignore_errors=True)
    timings["total"] = time.perf_counter() - t_start
    logger.info("optimize: %s backend ready in %.1f s", backend_name, timings["total"])
    return optimized


def _lower_all(graphs: dict, lowering, folder, phases: dict, entries: dict, timings: dict) -> None:
    """Lower each phase graph into ``phases`` (and, with a cache ``folder``, its files into ``entries``)."""
    for phase, g in graphs.items():
        phase_lowering = lowering_for(lowering, g.gm, g.ctx)
        with _Stage(f"compile[{phase_lowering.name}:{phase}]", timings):
            if folder is None:
                phases[phase] = (phase_lowering.lower(g.gm, g.ctx), g.ctx.model_signature)
            else:  # lowered once, into the cache entry, and run from there (the engine a bundle loads)
                entries[phase] = lowering.save(g.gm, g.ctx, folder)
                phases[phase] = (lowering.load(folder, entries[phase], g.ctx), g.ctx.model_signature)


def _lazy_phase(phase: str, model, config: OptimizeConfig, seq_len: int, geometry, lowering, graphs: dict | None,
                report: OptimizeReport):
    """A phase built on its first call. Only "score" is: forward() returning every position's
    logits (not generate(), which never waits for a compile: see graph_phases)."""
    def build():
        gm, signature = capture_mod.capture_phase(model, phase, config.cache.max_batch_size, seq_len, geometry)
        graph, report.phases[phase] = run_phase_pipeline(gm, signature, config, seq_len, executor_device(model))
        if graphs is not None:
            graphs[phase] = graph
        return lowering_for(lowering, graph.gm, graph.ctx).lower(graph.gm, graph.ctx), graph.ctx.signature
    return build


def lowering_for(lowering, gm: torch.fx.GraphModule, ctx: PassContext):
    """The backend that runs the phase: ``lowering``, or the eager one for bf16 matrix
    products that ``lowering`` has no kernels for (see OrtBackend.bf16_matmuls)."""
    if ctx.matmul_dtype is torch.bfloat16 and not lowering.bf16_matmuls and bf16_matmuls.has_bf16_matmuls(gm):
        from .backends.eager import EagerBackend

        logger.info("%s: bf16 linear layers run on the eager backend (the %s backend has no bf16 matmul)",
                    ctx.phase, lowering.name)
        return EagerBackend()
    return lowering


def _runtime(model, config: OptimizeConfig, seq_len: int, geometry, executor: StepExecutor, **kwargs) -> OptimizedModel:
    """The OptimizedModel over compiled phases: the KV manager the config asks for, the runner."""
    vocab = model.get_input_embeddings().weight.shape[0]
    if config.cache.paged:
        kv = PagedKV(geometry, executor_device(model), seq_len, num_blocks=default_pool_blocks(geometry, config.cache, seq_len),
                     block_size=config.cache.block_size,
                     prefix_cache=config.cache.prefix_cache and "extend" in executor.phases)
    else:
        kv = ContiguousKV(geometry, executor_device(model), seq_len)
    return OptimizedModel(Runner(kv, executor, config.cache.max_batch_size, vocab), model.config,
                          model.generation_config, original_model=model, **kwargs)


def executor_device(model) -> torch.device:
    return next(model.parameters()).device


# Models with more weight bytes than this skip the compile cache: an entry is a bundle, whose
# engine files each hold a copy of the weights, and a process served from it would load one
# copy per phase (in-process lowering shares the model's own memory instead, see memory.py).
CACHE_MAX_WEIGHT_BYTES = 1 << 30


def _compile_cache(cache, backend_name: str, model=None):
    """The compile cache optimize() uses, or None: ``cache`` is True/False/None (None:
    on unless ``PDCOMPILE_CACHE=0``), or a folder, or a :class:`compile_cache.CompileCache`."""
    if cache is None:
        cache = os.environ.get("PDCOMPILE_CACHE", "1").strip().lower() not in ("0", "false", "off", "no")
    if cache is False:
        return None
    backend = backend_class(backend_name)
    if not (backend.exportable and backend.cacheable):
        logger.debug("compile cache: the %s backend has no engine files to cache; compiling", backend_name)
        return None
    if model is not None and (size := memory.weight_bytes(model)) > CACHE_MAX_WEIGHT_BYTES:
        logger.info("compile cache: not used for %.1f GB of weights (its entries hold a copy of the weights per "
                    "phase; over %.0f GB optimize() compiles each time)", size / 1e9, CACHE_MAX_WEIGHT_BYTES / 1e9)
        return None
    if cache is True:
        return compile_cache.CompileCache()
    if isinstance(cache, compile_cache.CompileCache):
        return cache
    if isinstance(cache, (str, os.PathLike)):
        return compile_cache.CompileCache(cache)
    raise TypeError(f"cache must be True, False, None, a folder or a CompileCache, got {type(cache).__name__}")


def _from_cache(store, key: str, model, config: OptimizeConfig, lowering, device, timings: dict, t_start: float):
    """The OptimizedModel served from the cache entry ``key``, or None (a miss). An entry that
    fails any of the bundle's checks is removed, with a warning, and the caller rebuilds it."""
    from .bundle import BundleError, _checked, _geometry, load_phases

    path = store.lookup(key)
    if path is None:
        logger.info("compile cache: miss (%s)", key[:12])
        return None
    t0 = time.perf_counter()
    try:
        # native engines (inductor) were compiled by this user into this user's cache folder
        manifest, _ = _checked(path, None, trust_native_code=True)
        if manifest["backend"] != lowering.name:
            raise BundleError(f"it holds {manifest['backend']} engines, not {lowering.name}")
        cache_cfg = dataclasses.replace(config.cache, paged=manifest["cache"]["paged"],
                                        block_size=manifest["cache"]["block_size"] or config.cache.block_size,
                                        max_seq_len=manifest["limits"]["max_seq_len"])
        config = dataclasses.replace(config, cache=cache_cfg)
        phases = load_phases(path, manifest, lowering, cache_cfg, device)
        report = OptimizeReport.from_dict(manifest["report"]) if manifest["report"] else OptimizeReport(lowering.name)
    except (BundleError, OSError, KeyError, TypeError, ValueError) as e:
        logger.warning("compile cache: entry %s is unusable (%s); removing it and compiling again", key[:12], e)
        store.remove(key)
        return None
    timings["cache hit"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start
    report.timings = timings
    logger.info("cache hit: loaded in %.1f s (entry %s)", timings["cache hit"], path)
    logger.info("optimize: %s backend ready in %.1f s", lowering.name, timings["total"])
    seq_len = cache_cfg.max_seq_len
    geometry = _geometry(manifest)
    score = _lazy_phase("score", model, config, seq_len, geometry, lowering, None, report)
    return _runtime(model, config, seq_len, geometry, StepExecutor(phases, lazy={"score": score}), report=report,
                    backend=lowering.name, bundle_path=path)
