"""``pdcompile.optimize``: capture, pass pipelines, lowering, runtime."""

from __future__ import annotations

import logging
import time

import torch

from . import capture as capture_mod
from .backends import default_backend, get_backend
from .config import CacheConfig, OptimizeConfig, PassConfig
from .passes import DECODE_PIPELINE, PREFILL_PIPELINE, SCORE_PIPELINE, run_pipeline
from .report import OptimizeReport
from .runtime import OptimizedModel, PhaseRunner

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


def _resolve_config(model, config: OptimizeConfig | None, backend, max_batch_size, max_seq_len, disable_passes):
    if config is None:
        config = OptimizeConfig(
            backend=backend,
            cache=CacheConfig(max_batch_size=max_batch_size, max_seq_len=max_seq_len),
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
    return config, seq


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
    for phase, pipeline in (("prefill", PREFILL_PIPELINE), ("decode", DECODE_PIPELINE)):
        with _Stage(f"passes[{phase}]", timings):
            graphs[phase], report.phases[phase] = run_pipeline(getattr(captured, phase), pipeline, config.passes, phase=phase)
    return captured, graphs, report


def optimize(
    model,
    backend: str | None = None,
    *,
    max_batch_size: int = 8,
    max_seq_len: int | None = None,
    disable_passes=(),
    config: OptimizeConfig | None = None,
) -> OptimizedModel:
    """Capture ``model`` as prefill and decode graphs, transform and compile them.

    Args:
        model: a transformers causal LM (``AutoModelForCausalLM``), decoder-only.
        backend: "eager" (the reference), "inductor", "onnxruntime", "tensorrt";
            ``None`` picks the default for the model's device.
        max_batch_size / max_seq_len: the capacity; requests beyond it raise.
        disable_passes: names of graph passes to skip (see ``pdcompile.passes``).
        config: an :class:`OptimizeConfig` instead of the keyword arguments.

    Returns an :class:`OptimizedModel` with the HF model's generate()/forward().
    """
    config, seq_len = _resolve_config(model, config, backend, max_batch_size, max_seq_len, disable_passes)
    device = next(model.parameters()).device
    backend_name = config.backend or default_backend(device)
    compile_phase = get_backend(backend_name)
    timings: dict[str, float] = {}
    t_start = time.perf_counter()
    captured, graphs, report = transform(model, config, seq_len, timings)
    report.backend = backend_name
    options = {"max_batch_size": config.cache.max_batch_size, "max_seq_len": seq_len, "device": device}
    compiled = {}
    for phase, gm in graphs.items():
        with _Stage(f"compile[{phase}:{backend_name}]", timings):
            compiled[phase] = compile_phase(gm, phase, None, options)

    def score_factory():
        gm = capture_mod.capture_phase(model, "score", config.cache.max_batch_size, seq_len, captured.geometry)
        gm, report.phases["score"] = run_pipeline(gm, SCORE_PIPELINE, config.passes, phase="score")
        return compile_phase(gm, "score", None, options)

    timings["total"] = time.perf_counter() - t_start
    logger.info("optimize: %s backend ready in %.1f s", backend_name, timings["total"])
    vocab = model.get_input_embeddings().weight.shape[0]
    runner = PhaseRunner(
        compiled["prefill"], compiled["decode"], captured.geometry, device,
        config.cache.max_batch_size, seq_len, vocab,
    )
    return OptimizedModel(
        runner, model.config, model.generation_config, original_model=model,
        report=report, score_factory=score_factory, backend=backend_name, graphs=graphs,
    )
