"""Graph passes and the per-phase pipelines.

The pipelines are explicit ordered lists; ``OptimizeConfig.passes`` switches passes
off by name. Each pass lives in its own file; see README.md in this folder for the
invariants every pass keeps.
"""

from __future__ import annotations

from . import bf16_matmuls, decode_attention_mask, fuse_causal_mask, paged_kv, prune_final_layer, quantize_weights, remove_noops
from .manager import GraphPass, PassError, PassRecord, PassResult, cleanup, refresh_meta, run_pipeline

PREFILL_PIPELINE: list[GraphPass] = [
    remove_noops.PASS,
    fuse_causal_mask.PASS,
    prune_final_layer.PASS,  # after the fusion: it turns causal attention into one query per row
    paged_kv.PASS,  # the passes above see the capture's contiguous caches
    quantize_weights.PASS,  # the passes above match HF's linear layers
    bf16_matmuls.PASS,  # after quantize_weights: it converts the dequantized prefill form too
]
DECODE_PIPELINE: list[GraphPass] = [
    remove_noops.PASS,
    decode_attention_mask.PASS,
    paged_kv.PASS,
    quantize_weights.PASS,
]
# New tokens after a cached prefix (prefix caching; later chunked prefill, speculative verify).
EXTEND_PIPELINE: list[GraphPass] = [
    remove_noops.PASS,
    decode_attention_mask.PASS,  # S queries against the cache: keys 0..start[b] + i
    prune_final_layer.PASS,
    paged_kv.PASS,
    quantize_weights.PASS,
    bf16_matmuls.PASS,
]
# Prefill returning every position's logits (forward() without logits_to_keep).
SCORE_PIPELINE: list[GraphPass] = [
    remove_noops.PASS,
    fuse_causal_mask.PASS,
    paged_kv.PASS,
    quantize_weights.PASS,
    bf16_matmuls.PASS,
]

ALL_PASSES = {p.name: p for p in PREFILL_PIPELINE + DECODE_PIPELINE + EXTEND_PIPELINE + SCORE_PIPELINE}

__all__ = [
    "ALL_PASSES", "DECODE_PIPELINE", "EXTEND_PIPELINE", "GraphPass", "PREFILL_PIPELINE", "PassError", "PassRecord",
    "PassResult", "SCORE_PIPELINE", "cleanup", "refresh_meta", "run_pipeline",
]
