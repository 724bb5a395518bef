"""Paged KV cache: per-sequence contiguous caches -> a shared pool of fixed-size blocks.

Before (decode; prefill and extend differ only in how many positions they write)::

    caches_0: [B, Hkv, T, D]                                 # one contiguous cache per row
    k_all = index_put_(caches_0, [rows, None, pos], k_new)    # write the new token's k
    out = pdcompile.attention(q, k_all, v_all, pos, ...)     # read the whole row

After::

    pool_0: [num_blocks, block_size, Hkv, D]                  # shared by every sequence
    block_table: [B, M]   slot_mapping: [B] (decode) | [B, S] (prefill, extend)
    k_pool = index_put_(pool_0, [slot // block_size, slot % block_size], k_new)     # scatter into slots
    out = pdcompile.paged_attention(q, k_pool, v_pool, block_table, pos, ...)  # reads through the table

A sequence owns a list of blocks (its row of ``block_table``); its position p lives in
slot ``block_table[b, p // block_size] * block_size + p % block_size`` and the runtime
hands the graph those slots directly (``slot_mapping``), so writes never need the
table. Reads go through ``pdcompile::paged_attention``, which takes the pools and the
table (its reference gathers the row's blocks back into position order; keys past the
row's length are hidden by the positions as before). A cache read by anything other
than the canonical attention is gathered into a ``[B, H, M * block_size, D]`` view instead. What this buys: sequences of different
lengths share one pool without padding, blocks can be shared between sequences that
start with the same tokens (prefix caching), and the pool outlives a call.

Sliding-window layers (their window comes with the cache's spec, from the config) get a
block table and slot mapping of their own, one pair per window: the runtime hands such a
table scratch block 0 for blocks that left the window and gives those blocks back to the
pool, so a sliding layer holds about ``window`` tokens of KV however long the sequence
grows. Its attention must read exactly that window (checked).

Matches the three cache writes the capture produces (``index_copy_`` of a prompt,
``index_put_`` of one token per row, ``index_put_`` of S tokens per row) and declines
(no rewrite at all) if a cache is read any other way. Padding positions of a batch
must be given a slot in a scratch block by the runtime.
"""

from __future__ import annotations

import torch
from torch._dynamo.source import ConstantSource
from torch.fx.experimental.symbolic_shapes import DimDynamic

from ..phase import PassContext, Role
from .manager import GraphPass, PassResult
from .utils import ATTENTION, PAGED_ATTENTION, aten, val


NAME = "paged_kv"


def _new_dim(mode, name: str, hint: int):
    env = mode.shape_env
    sym = env.create_symbol(hint, source=ConstantSource(name), dynamic_dim=DimDynamic.DYNAMIC)
    return env.create_symintnode(sym, hint=hint, source=ConstantSource(name))


def _classify(write: torch.fx.Node) -> str | None:
    """'prompt' | 'token' | 'tokens' for the capture's three cache writes."""
    if write.target is aten.index_copy_.default and write.args[1] == 2:
        return "prompt"
    if write.target is aten.index_put_.default:
        idx = write.args[1]
        if len(idx) == 3 and idx[1] is None:
            slots = val(idx[2])
            return "token" if slots.dim() == 1 else "tokens" if slots.dim() == 2 else None
    return None


def paged_kv(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    """Rewrite ``gm`` in place to ``ctx.cache.block_size``-token blocks; the result carries the paged signature."""
    graph = gm.graph
    block_size = ctx.cache.block_size
    sig = ctx.signature
    nodes = sig.nodes(gm)
    caches = nodes[Role.CACHE]
    if not caches:
        return PassResult(gm, 0, "no cache inputs (already paged?)")
    ids = nodes[Role.TOKENS][0]
    # The batch size may have been read off a cache (export picks any source for a
    # symbol); read it off input_ids instead, so the cache can go.
    for cache in caches:
        for user in list(cache.users):
            if user.target is aten.sym_size.int and user.args[1] == 0:
                with graph.inserting_after(ids):
                    batch_size = graph.call_function(aten.sym_size.int, (ids, 0))
                batch_size.meta["val"] = user.meta.get("val")
                user.replace_all_uses_with(batch_size)
                graph.erase_node(user)
    plans = {}
    for cache in caches:
        writes = [u for u in cache.users if u.op == "call_function" and _classify(u)]
        others = [u for u in cache.users if u not in writes]
        if len(writes) != 1 or others:
            return PassResult(gm, 0, f"{cache.name} is read outside its cache write ({[u.name for u in others][:3]}); left contiguous")
        plans[cache] = writes[0]
    kinds = {_classify(w) for w in plans.values()}
    if len(kinds) != 1:
        return PassResult(gm, 0, f"mixed cache write kinds {kinds}")
    kind = kinds.pop()

    new_sig = sig.paged(block_size)
    mode = torch._guards.detect_fake_mode([val(ids)])
    batch = val(ids).shape[0]
    blocks_per_seq = _new_dim(mode, "kv_blocks_per_seq", 5)
    num_blocks = _new_dim(mode, "kv_pool_blocks", 37)
    # one (block_table, slot_mapping) pair per window, in the signature's order
    anchor = [n for n, spec in zip(graph.find_nodes(op="placeholder"), sig.inputs) if spec.role is not Role.CACHE][-1]
    tables, slot_maps = {}, {}
    for table_spec, slots_spec in zip(new_sig.of(Role.BLOCK_TABLE), new_sig.of(Role.SLOT_MAPPING)):
        with graph.inserting_after(anchor):
            table = graph.placeholder(table_spec.name)
        with graph.inserting_after(table):
            slots = graph.placeholder(slots_spec.name)
        with mode:
            table.meta["val"] = torch.empty(batch, blocks_per_seq, dtype=torch.long, device=val(ids).device)
            smap_shape = (batch,) if kind == "token" else (batch, val(ids).shape[1])
            slots.meta["val"] = torch.empty(smap_shape, dtype=torch.long, device=val(ids).device)
        tables[table_spec.window], slot_maps[slots_spec.window] = table, slots
        anchor = slots

    pool_of = {}  # gathered full-cache view -> (the pool it reads after this step's write, its block table)
    for (cache, write), pool_spec in zip(plans.items(), new_sig.of(Role.POOL)):
        block_table, slot_mapping = tables[pool_spec.window], slot_maps[pool_spec.window]
        cv = val(cache)
        heads, dim = int(cv.shape[1]), int(cv.shape[3])
        with graph.inserting_before(cache):
            pool = graph.placeholder(pool_spec.name)
        with mode:
            pool.meta["val"] = torch.empty(num_blocks, block_size, heads, dim, dtype=cv.dtype, device=cv.device)
        with graph.inserting_before(write):
            flat_slots = graph.call_function(aten.reshape.default, (slot_mapping, [-1]))
            blk = graph.call_function(aten.div.Tensor_mode, (flat_slots, block_size), {"rounding_mode": "floor"})
            off = graph.call_function(aten.remainder.Scalar, (flat_slots, block_size))
            if kind == "prompt":  # values k: [B, H, S, D] -> [B*S, H, D]
                values = graph.call_function(aten.transpose.int, (write.args[3], 1, 2))
            else:  # token: [B, H, D]; tokens: [B, S, H, D]
                values = write.args[2]
            values = graph.call_function(aten.reshape.default, (values, [-1, heads, dim]))
            new_write = graph.call_function(aten.index_put_.default, (pool, [blk, off], values))
            readers = [u for u in write.users]
            if readers:  # the full cache as attention reads it: [B, H, M * block_size, D]
                # gather from the write's result, so the read is ordered after the write
                gathered = graph.call_function(aten.index.Tensor, (new_write, [block_table]))
                b_sym = graph.call_function(aten.sym_size.int, (block_table, 0))
                flat = graph.call_function(aten.reshape.default, (gathered, [b_sym, -1, heads, dim]))
                full = graph.call_function(aten.transpose.int, (flat, 1, 2))
                write.replace_all_uses_with(full)
                pool_of[full] = (new_write, block_table, pool_spec.window)
        graph.erase_node(write)
        graph.erase_node(cache)
    paged = _to_paged_attention(graph, pool_of)
    if isinstance(paged, str):
        raise PagedWindowError(paged)
    detail = f"{len(plans)} caches -> pools of {block_size}-token blocks ({kind} writes)"
    if paged:
        detail += f"; {paged} attention(s) read the pools through the block table"
    return PassResult(gm, len(plans), detail, signature=new_sig)


class PagedWindowError(RuntimeError):
    """A sliding layer's attention reads a different window than its config gives."""


def _to_paged_attention(graph: torch.fx.Graph, pool_of: dict) -> int | str:
    """``attention(q, gather(k_pool), gather(v_pool), ...)`` -> ``paged_attention(q, k_pool, v_pool, block_table, ...)``.

    The gathers then die (the manager's DCE): the canonical op says where keys live and each
    backend reads them its own way. Attention over anything else is left as it is.
    A sliding layer's table forgets blocks that left the config's window, so its attention
    must read exactly that window; any other window is an error, not a silent wrong answer.
    """
    done = 0
    for node in list(graph.nodes):
        if node.target is not ATTENTION or node.args[1] not in pool_of or node.args[2] not in pool_of:
            continue
        q, k, v, q_pos, scale, window = (list(node.args) + [0])[:6]
        (k_pool, table, k_window), (v_pool, _, _) = pool_of[k], pool_of[v]
        if k_window and window != k_window:
            return (f"{node.name} attends to a window of {window or 'all'} positions over a cache whose layer "
                    f"the config gives a sliding window of {k_window}")
        with graph.inserting_before(node):
            new = graph.call_function(PAGED_ATTENTION, (q, k_pool, v_pool, table, q_pos, scale, window))
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        done += 1
    return done


PASS = GraphPass(NAME, paged_kv, __doc__)
