"""``pdcompile.optimize``: capture, pass pipelines, lowering, runtime."""

from __future__ import annotations

import dataclasses
import logging
import os
import time

import torch

from . import capture as capture_mod
from .backends import default_backend, get_backend
from .config import CacheConfig, OptimizeConfig, PassConfig
from .passes import DECODE_PIPELINE, EXTEND_PIPELINE, PREFILL_PIPELINE, SCORE_PIPELINE, paged_kv, run_pipeline
from .report import OptimizeReport
from .runtime import OptimizedModel, PagedRunner, PhaseRunner

logger = logging.getLogger(__name__)


def default_max_seq_len(config) -> int:
    """The model's own limit: its position table, and its sliding window if it has one.

    Beyond a sliding window the captured decode mask (one shared query offset, see
    capture.py) would no longer match HF's, so sequences are capped at the window.
    """
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 2048
    window = getattr(config, "sliding_window", None)
    if isinstance(window, int) and window > 0 and getattr(config, "use_sliding_window", True) is not False:
        limit = min(limit, window)
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
            "max_position_embeddings / sliding_window of its config)"
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


def transform(model, config: OptimizeConfig, seq_len: int, timings: dict, attn_implementation: str = "sdpa"):
    """Capture + pass pipelines, no compilation: (captured model, {phase: graph}, report)."""
    with _Stage("capture", timings):
        captured = capture_mod.capture(model, config.cache.max_batch_size, seq_len, attn_implementation)
    report = OptimizeReport(backend=config.backend or "", timings=timings)
    graphs = {}
    for phase in ("prefill", "decode"):
        with _Stage(f"passes[{phase}]", timings):
            graphs[phase], report.phases[phase] = run_pipeline(
                getattr(captured, phase), PIPELINES[phase], config.passes, phase=phase)
    if config.cache.paged and not all(_is_paged(g) for g in graphs.values()):
        reason = next(r.detail for recs in report.phases.values() for r in recs if r.name == paged_kv.NAME and not r.matches)
        logger.warning("paged KV cache not applicable to this model (%s): using contiguous caches", reason)
        config = dataclasses.replace(config, cache=dataclasses.replace(config.cache, paged=False),
                                     passes=PassConfig(disabled=config.passes.disabled | {paged_kv.NAME}))
        return transform(model, config, seq_len, timings, attn_implementation)
    return captured, graphs, report, config


def compile_phases(backend: str, compile_phase, graphs: dict, options: dict) -> dict:
    """Compile prefill and decode; for backends that lower to files, the two in parallel.

    Lowering to ONNX is tracing-bound Python (one core each): the decode phase is lowered
    in a forked child that writes its engine file while this process compiles prefill,
    then loaded here. ``PDCOMPILE_PARALLEL_COMPILE=0`` turns this off; where fork is
    unavailable, or the child fails (logged), the phases are compiled one after the other.
    """
    engine = _file_engine(backend)
    if engine is None or len(graphs) < 2 or not hasattr(os, "fork") or os.environ.get("PDCOMPILE_PARALLEL_COMPILE") == "0":
        return {phase: compile_phase(gm, phase, None, options) for phase, gm in graphs.items()}
    import json
    import shutil
    import tempfile
    import traceback

    tmp = tempfile.mkdtemp(prefix="pdcompile-lower-")
    child_phase = "decode"
    pid = os.fork()
    if pid == 0:  # child: lower one phase to a file, never return into the caller's code
        code = 1
        try:
            logging.disable(logging.CRITICAL)  # the parent's handlers (and their locks) are not ours
            torch.set_num_threads(1)
            entry = engine.save_phase(graphs[child_phase], child_phase, tmp, options)
            with open(os.path.join(tmp, "entry.json"), "w") as f:
                json.dump(entry, f)
            code = 0
        except BaseException:
            with open(os.path.join(tmp, "error.txt"), "w") as f:
                f.write(traceback.format_exc())
        finally:
            os._exit(code)
    try:
        phases = {p: compile_phase(gm, p, None, options) for p, gm in graphs.items() if p != child_phase}
        _, status = os.waitpid(pid, 0)
        entry_path = os.path.join(tmp, "entry.json")
        if status == 0 and os.path.exists(entry_path):
            with open(entry_path) as f:
                phases[child_phase] = engine.load_phase(tmp, json.load(f), options["device"])
        else:
            err = open(os.path.join(tmp, "error.txt")).read() if os.path.exists(os.path.join(tmp, "error.txt")) else f"exit status {status}"
            logger.warning("parallel lowering of %s failed, compiling it here instead:\n%s", child_phase, err[-2000:])
            phases[child_phase] = compile_phase(graphs[child_phase], child_phase, None, options)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {p: phases[p] for p in graphs}


def _file_engine(backend: str):
    """The engine module of backends whose compile is 'write a file, load it' (onnxruntime)."""
    if backend != "onnxruntime":
        return None
    from .backends import onnxruntime as engine

    return engine


def _is_paged(gm) -> bool:
    return any(n.op == "placeholder" and n.name.startswith("pool_") for n in gm.graph.nodes)


def optimize(
    model,
    backend: str | None = None,
    *,
    max_batch_size: int = 8,
    max_seq_len: int | None = None,
    disable_passes=(),
    paged: bool = True,
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
        paged: KV cache as a shared pool of 16-token blocks (default) or one contiguous
            cache per call.
        prefix_cache: reuse cached blocks of a repeated prompt prefix (paged only).
        kv_cache_memory: bytes for the paged pool (default: enough for max_batch_size
            full-length sequences, at most 512 MiB).
        config: an :class:`OptimizeConfig` instead of the keyword arguments.

    Returns an :class:`OptimizedModel` with the HF model's generate()/forward().
    """
    config, seq_len = _resolve_config(model, config, backend, max_batch_size, max_seq_len, disable_passes,
                                      paged=paged, prefix_cache=prefix_cache, kv_cache_memory=kv_cache_memory)
    device = next(model.parameters()).device
    backend_name = config.backend or default_backend(device)
    compile_phase = get_backend(backend_name)
    timings: dict[str, float] = {}
    t_start = time.perf_counter()
    captured, graphs, report, config = transform(model, config, seq_len, timings)
    report.backend = backend_name
    pool_blocks = default_pool_blocks(captured.geometry, config.cache, seq_len) if config.cache.paged else None
    options = {"max_batch_size": config.cache.max_batch_size, "max_seq_len": seq_len, "device": device,
               "kv_pool_blocks": pool_blocks}
    with _Stage(f"compile[{backend_name}]", timings):
        phases = compile_phases(backend_name, compile_phase, graphs, options)

    def lazy(phase):
        def build():
            gm = capture_mod.capture_phase(model, phase, config.cache.max_batch_size, seq_len, captured.geometry)
            gm, report.phases[phase] = run_pipeline(gm, PIPELINES[phase], config.passes, phase=phase)
            graphs[phase] = gm
            return compile_phase(gm, phase, None, options)
        return build

    timings["total"] = time.perf_counter() - t_start
    logger.info("optimize: %s backend ready in %.1f s", backend_name, timings["total"])
    vocab = model.get_input_embeddings().weight.shape[0]
    args = (phases, captured.geometry, device, config.cache.max_batch_size, seq_len, vocab)
    lazy_phases = {"score": lazy("score"), "extend": lazy("extend")}
    if config.cache.paged:
        runner = PagedRunner(
            *args, lazy_phases=lazy_phases, block_size=config.cache.block_size,
            prefix_cache=config.cache.prefix_cache,
            num_blocks=pool_blocks,
        )
    else:
        runner = PhaseRunner(*args, lazy_phases=lazy_phases)
    return OptimizedModel(
        runner, model.config, model.generation_config, original_model=model,
        report=report, backend=backend_name, graphs=graphs,
    )
