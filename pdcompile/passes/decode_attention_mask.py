"""Decode (and extend) attention: HF's mask over the whole cache -> the per-row length it really is.

Before (per layer, mask shared)::

    pos, caches_0 --arange(T)/le/index/and/expand...--> mask[B, 1, 1, T] (bool)
    k = reshape(expand(unsqueeze(k_cache, 2)))          # repeat_kv copies the whole cache
    out = aten.scaled_dot_product_attention(q, k, v, mask, scale=s)

After::

    out = pdcompile.attention(q, k_cache, v_cache, pos, s, window)

``pos[b]`` is the position of row b's new token, so keys 0..pos[b] are visible: the
mask is two integers per row instead of a tensor the size of the cache, and the kv
heads are read in place instead of being repeated for grouped-query attention.

Deliberately NOT causal: one query against the cache is not "causal" in SDPA's sense
(``is_causal`` would align the query with key 0 and hide the whole cache).

The extend graph (S new tokens after a cached prefix, input ``start``) is the same
rewrite with S queries: query i of row b sees keys 0..start[b] + i.

Match: an SDPA whose ``attn_mask`` is computed only from ``pos``, the shapes of the
inputs and constants; the mask sub-graph is evaluated on sample rows (several
positions, one at the maximum cache length) and must equal "keys 0..pos[b]" (a
sliding window is recognised and kept). A mask that contradicts the contract raises.
"""

from __future__ import annotations

import torch

from ..phase import PassContext, Role
from .fuse_causal_mask import _seq_upper_bound
from .manager import GraphPass, PassResult
from .utils import SDPA, fuse_if_contract, sdpa_args, val

NAME = "decode_attention_mask"


def _samples(nodes: list[torch.fx.Node], names: dict[Role, str], queries: int, capacity_max: int):
    cases = [([0, 7, 12], 16), ([3], 9), ([capacity_max - queries, capacity_max // 2], capacity_max)]
    for positions, capacity in cases:
        batch = len(positions)
        inputs = {names[Role.TOKENS]: torch.zeros(batch, queries, dtype=torch.long),
                  names[Role.POSITIONS]: torch.tensor(positions)}
        if Role.LAST_IDX in names:  # extend
            inputs[names[Role.LAST_IDX]] = torch.full((batch,), queries - 1)
        for node in nodes:
            if node.op == "placeholder" and node.name not in inputs:
                v = val(node)
                inputs[node.name] = torch.zeros(batch, int(v.shape[1]), capacity, int(v.shape[3]), dtype=v.dtype)
        yield inputs, positions


def _check(keep: torch.Tensor, positions: list[int], window: int) -> str | None:
    capacity, queries = keep.shape[-1], keep.shape[-2]
    j = torch.arange(capacity).view(1, -1)
    for b, p in enumerate(positions):
        qi = p + torch.arange(queries).view(-1, 1)
        want = (j <= qi) & ((qi - j < window) if window else True)  # [Sq, T]
        got = keep[b if keep.shape[0] > 1 else 0].reshape(-1, queries, capacity)
        if not bool((got == want).all()):
            return f"row at position {p} of a {capacity}-slot cache keeps {int(got[0, 0].sum())} keys, expected {int(want[0].sum())}"
    return None


def _infer_window(keep: torch.Tensor, positions: list[int]) -> int:
    """A sliding window shows as fewer keys for the first query of the first row."""
    w = int(keep[0].reshape(-1, keep.shape[-1])[0].sum())
    return w if w < positions[0] + 1 else 0


def decode_attention_mask(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    sig = ctx.signature
    if not sig.has(Role.POSITIONS):
        return PassResult(gm, 0, "not a decode or extend graph (no positions input)")
    nodes = sig.nodes(gm)
    pos = nodes[Role.POSITIONS][0]
    names = {role: found[0].name for role, found in nodes.items() if len(found) == 1}
    # decode: one query per row; extend: evaluate with a few new tokens per row
    single = sig.inputs[sig.index(Role.TOKENS)].shape[1] == 1
    queries = 1 if single else 4
    caches = nodes[Role.CACHE]
    capacity_max = _seq_upper_bound(val(caches[0]).transpose(1, 2), 512) if caches else 512
    sdpas = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is SDPA]
    if not sdpas:
        return PassResult(gm, 0, "no aten.scaled_dot_product_attention in the graph (attention is not SDPA)")
    verdicts: dict[torch.fx.Node, int] = {}
    declined, done = [], 0
    for sdpa in sdpas:
        a = sdpa_args(sdpa)
        mask = a["attn_mask"]
        if mask is None or a["dropout_p"] or (single and int(val(a["query"]).shape[2]) != 1):
            declined.append(f"{sdpa.name}: not queries against a masked cache")
            continue
        allowed = {pos.name} | ({names[Role.LAST_IDX]} if Role.LAST_IDX in names else set())
        done += fuse_if_contract(
            gm, sdpa, pos, verdicts, declined, allowed=allowed, samples=lambda n: _samples(n, names, queries, capacity_max),
            check=_check, infer_window=_infer_window,
            what=f"the cached attention mask feeding {sdpa.name} does not match 'keys 0..{pos.name}[b] + i'",
        )
    detail = f"{done} SDPA mask(s) -> per-row positions"
    if declined:
        detail += f"; declined {len(declined)}: {declined[0]}"
    return PassResult(gm, done, detail)


PASS = GraphPass(NAME, decode_attention_mask, __doc__)
