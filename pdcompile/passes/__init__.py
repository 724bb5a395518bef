"""Graph passes and the per-phase pipelines.

The pipelines are explicit ordered lists; ``OptimizeConfig.passes`` switches passes
off by name. Each pass lives in its own file; see README.md in this folder for the
invariants every pass keeps.
"""

from __future__ import annotations

from .manager import GraphPass, PassError, PassRecord, PassResult, cleanup, refresh_meta, run_pipeline

PREFILL_PIPELINE: list[GraphPass] = []
DECODE_PIPELINE: list[GraphPass] = []
SCORE_PIPELINE: list[GraphPass] = []

ALL_PASSES = {p.name: p for p in PREFILL_PIPELINE + DECODE_PIPELINE + SCORE_PIPELINE}

__all__ = [
    "ALL_PASSES", "DECODE_PIPELINE", "GraphPass", "PREFILL_PIPELINE", "PassError", "PassRecord",
    "PassResult", "SCORE_PIPELINE", "cleanup", "refresh_meta", "run_pipeline",
]
