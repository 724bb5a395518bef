"""Causal-mask fusion (prefill): HF's materialised 4-D mask -> causal attention, no mask.

Before (per layer; the mask sub-graph is built once and shared)::

    last_idx, input_ids --arange/le/index/and/expand...--> mask[B, 1, S, S] (bool)
    k = reshape(expand(unsqueeze(k_rot, 2)))             # repeat_kv for GQA
    out = aten.scaled_dot_product_attention(q, k, v, mask, scale=s)

After::

    out = pdcompile.attention(q, k_rot, v_raw, None, s, window)   # causal, kv heads read directly

and the mask sub-graph is dead code (removed by the pass manager's DCE).

Why it is exact: the prefill contract (capture.py) feeds right-padded prompts, so a
real token i of row b attends to exactly keys 0..i; padding sits after every real token
and only padded queries (whose outputs are never read) differ from plain causal.

How a match is decided: on ops, then on numbers. An SDPA qualifies when its
``attn_mask`` is computed only from the phase inputs (``last_idx``, the shape of
``input_ids``) and constants -- no weights, no activations. That sub-graph is then
*evaluated* on sample batches (several paddings, and one prompt at the maximum
length) and must equal the causal mask on every real query; a sliding window is
recognised from the numbers and kept as ``window``. A mask that fails raises: the
graph would not compute what the contract says, so it must not run silently.
SDPA already called with ``is_causal=True`` and no mask is canonicalised too.

Deliberately skipped: attention that is not ``aten.scaled_dot_product_attention``
(models captured with eager attention) -- reported as no match.
"""

from __future__ import annotations

import torch

from ..phase import PassContext, Role
from .manager import GraphPass, PassResult
from .utils import SDPA, MaskContractError, first_visible_mismatch, fuse_if_contract, replace_with_attention, sdpa_args, val

NAME = "fuse_causal_mask"
__all__ = ["MaskContractError", "PASS"]


def _seq_upper_bound(ids_val, fallback: int) -> int:
    size = ids_val.shape[1]
    if isinstance(size, torch.SymInt):
        try:
            upper = size.node.shape_env.bound_sympy(size.node.expr).upper
            return int(upper) if upper.is_finite else fallback
        except (AttributeError, TypeError, ValueError):
            return fallback
    return int(size)


def _samples(nodes: list[torch.fx.Node], ids: torch.fx.Node, last_idx: torch.fx.Node, max_seq: int):
    """(inputs by placeholder name, lengths) for a few right-padded batches."""
    cases = [([7], 7), ([9, 4, 1], 9), ([2, 5], 5), ([max_seq], max_seq)]
    for lengths, seq in cases:
        batch = len(lengths)
        inputs = {ids.name: torch.zeros(batch, seq, dtype=torch.long), last_idx.name: torch.tensor(lengths) - 1}
        for node in nodes:  # cache tensors whose shape the mask reads
            if node.op == "placeholder" and node.name not in inputs:
                v = val(node)
                inputs[node.name] = torch.zeros(batch, int(v.shape[1]), seq + 1, int(v.shape[3]), dtype=v.dtype)
        yield inputs, lengths


def _check_causal(keep: torch.Tensor, lengths: list[int], window: int) -> str | None:
    seq = keep.shape[-1]
    if len(lengths) == 1 and seq > 64:  # the long sample: compare vectorised
        i = torch.arange(seq).view(-1, 1)
        j = torch.arange(seq).view(1, -1)
        want = (j <= i) & ((i - j < window) if window else True)
        got = keep[0].expand(keep.shape[1], seq, seq)
        if not bool((got == want).all()):
            return f"prompt of {seq} tokens: mask differs from causal{f' (window {window})' if window else ''}"
        return None

    def expected(b, i, j):
        return j <= i and (not window or i - j < window)

    return first_visible_mismatch(keep, expected, [(b, list(range(n))) for b, n in enumerate(lengths)])


def _infer_window(keep: torch.Tensor, lengths: list[int]) -> int:
    """Keys visible to the last query of a full-length single row: the window, if below the length."""
    seq = keep.shape[-1]
    if len(lengths) != 1 or lengths[0] != seq or keep.dim() != 4:
        return 0
    return int(keep[0, 0, seq - 1].sum())


def fuse_causal_mask(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    sig = ctx.signature
    if sig.has(Role.POSITIONS) or not sig.has(Role.LAST_IDX):
        return PassResult(gm, 0, f"not a prefill graph ({ctx.phase}: queries start after a cache)")
    ids, last_idx = sig.node(gm, Role.TOKENS), sig.node(gm, Role.LAST_IDX)
    max_seq = _seq_upper_bound(val(ids), 512)
    sdpas = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is SDPA]
    if not sdpas:
        return PassResult(gm, 0, "no aten.scaled_dot_product_attention in the graph (attention is not SDPA)")

    verdicts: dict[torch.fx.Node, int] = {}  # mask node -> window
    declined, already_causal, fused = [], 0, 0
    for sdpa in sdpas:
        a = sdpa_args(sdpa)
        mask = a["attn_mask"]
        if a["dropout_p"]:
            declined.append(f"{sdpa.name}: dropout_p={a['dropout_p']}")
            continue
        if mask is None:
            if a["is_causal"] and val(a["query"]).shape[2] == val(a["key"]).shape[2]:
                replace_with_attention(gm, sdpa, None, 0)
                already_causal += 1
            else:
                declined.append(f"{sdpa.name}: no mask and not causal")
            continue
        fused += fuse_if_contract(
            gm, sdpa, None, verdicts, declined, allowed={last_idx.name},
            samples=lambda nodes: _samples(nodes, ids, last_idx, max_seq), check=_check_causal,
            infer_window=_infer_window,
            what=f"the attention mask feeding {sdpa.name} is not causal for real tokens; pdcompile cannot run this "
                 "model's prefill correctly",
        )

    windows = sorted({w for w in verdicts.values() if w > 0})
    parts = []
    if fused:
        parts.append(f"{fused} SDPA mask(s) -> causal attention{f' (sliding window {windows})' if windows else ''}")
    if already_causal:
        parts.append(f"{already_causal} SDPA already is_causal")
    if declined:
        parts.append(f"declined {len(declined)}: {declined[0]}")
    return PassResult(gm, fused + already_causal, "; ".join(parts))


PASS = GraphPass(NAME, fuse_causal_mask, __doc__)
