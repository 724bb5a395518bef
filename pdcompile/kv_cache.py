"""The KV-cache manager: owns the cache memory and builds each step's inputs, by role.

One of the runtime's three parts (see runtime.py): this one decides *where* keys and
values live; :class:`~pdcompile.executor.StepExecutor` calls a phase graph on the inputs
made here; the HF-facing :class:`~pdcompile.runtime.OptimizedModel` runs generate() and
forward() over both.

* :class:`ContiguousKV`: one ``[B, H, T, D]`` cache per k/v and layer for each batch,
  grown in steps of 64 slots.
* :class:`PagedKV`: one pool of ``block_size``-token blocks per k/v and layer, shared by
  every sequence, with prefix caching (kv_pool.py holds the block bookkeeping).

Inputs are built with tensor ops (no per-token Python). Decode inputs live in persistent
buffers, one set per batch size, so a step writes into memory a CUDA-graph capture of that
batch size could replay. Blocks go back to the pool when a batch finishes (generate()
does that in a ``finally``; forward()'s cache object on ``release()`` or when dropped).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .capture import CacheGeometry
from .kv_pool import BlockPool, block_hashes
from .phase import Role

_CAPACITY_STEP = 64  # contiguous caches: capacity of a call rounded up to this, to reuse shapes


class CapacityError(ValueError):
    """A request does not fit the limits the model was optimized for."""


@dataclass
class Sequences:
    """One batch in flight: its prompts, positions and where its KV cache lives."""

    ids: torch.Tensor  # [B, S] right-padded prompts
    lengths: torch.Tensor  # [B] prompt lengths
    pos: torch.Tensor  # [B] position of the next token each row will feed
    caches: list[torch.Tensor] | None = None  # contiguous cache: [B, H, T, D] per layer (k, v)
    blocks: list[list[int]] | None = None  # paged cache: the blocks each row owns, in position order
    # paged: ``blocks`` of every KV group (full attention first, then each sliding window);
    # a sliding group's entry is 0 where the block left the window and went back to the pool
    group_blocks: list[list[list[int]]] | None = None
    dropped: list[list[int]] | None = None  # paged, per group and row: leading blocks given back
    reused: list[int] = field(default_factory=list)  # prompt tokens served by the prefix cache, per row
    finished: bool = False
    table: list[torch.Tensor] | None = None  # paged: each group's block_table as last sent to the graphs
    table_key: tuple = ()  # paged: blocks per row when ``table`` was built


class _DecodeBuffers:
    """Persistent decode inputs of one batch size: what a CUDA-graph bucket would capture."""

    def __init__(self, batch: int, device, groups: int = 1):
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(batch, dtype=torch.long, device=device)
        self.slots = [torch.zeros(batch, dtype=torch.long, device=device) for _ in range(groups)]  # per KV group


class ContiguousKV:
    paged = False

    def __init__(self, geometry: CacheGeometry, device: torch.device, max_seq_len: int):
        self.geometry, self.device, self.max_seq_len = geometry, device, max_seq_len
        self._decode: dict[int, _DecodeBuffers] = {}
        self.last_batch_bytes = 0  # KV bytes the last finished batch held at its end (its peak)

    def buffers(self, batch: int) -> _DecodeBuffers:
        if batch not in self._decode:
            self._decode[batch] = _DecodeBuffers(batch, self.device)
        return self._decode[batch]

    def start(self, ids: torch.Tensor, lengths: torch.Tensor, max_new_tokens: int, reuse: bool = True) -> Sequences:
        """Reserve cache room for prompts ``ids`` (right-padded) plus ``max_new_tokens``."""
        cap = -(-(int(lengths.max()) + max_new_tokens) // _CAPACITY_STEP) * _CAPACITY_STEP
        cap = max(2, min(cap, self.max_seq_len))
        caches = self.geometry.allocate(ids.shape[0], cap, self.device)
        return Sequences(ids.contiguous(), lengths, lengths.clone(), caches=caches, reused=[0] * ids.shape[0])

    def prefill_inputs(self, seqs: Sequences, phase: str) -> tuple[str, dict]:
        # Compiled graphs assume the contiguous layouts they were traced with.
        return phase, {Role.TOKENS: seqs.ids, Role.LAST_IDX: (seqs.lengths - 1).contiguous(), Role.CACHE: seqs.caches}

    def after_prefill(self, seqs: Sequences) -> None:
        pass

    def decode_inputs(self, seqs: Sequences, tokens: torch.Tensor) -> dict:
        """Inputs feeding one token per row at ``seqs.pos``."""
        if int(seqs.pos.max()) >= seqs.caches[0].shape[2]:
            self._grow(seqs)
        buf = self.buffers(seqs.pos.shape[0])
        buf.ids.copy_(tokens.reshape(-1, 1))
        buf.pos.copy_(seqs.pos)
        return {Role.TOKENS: buf.ids, Role.POSITIONS: buf.pos, Role.CACHE: seqs.caches}

    def _grow(self, seqs: Sequences) -> None:
        if int(seqs.pos.max()) + 1 > self.max_seq_len:
            raise CapacityError(f"sequence would exceed max_seq_len={self.max_seq_len}")
        old = seqs.caches
        cap = min(old[0].shape[2] + _CAPACITY_STEP, self.max_seq_len)
        seqs.caches = self.geometry.allocate(old[0].shape[0], cap, self.device)
        for o, n in zip(old, seqs.caches):
            n[:, :, : o.shape[2]].copy_(o)

    def finish(self, seqs: Sequences) -> None:
        if not seqs.finished and seqs.caches is not None:
            self.last_batch_bytes = sum(c.numel() * c.element_size() for c in seqs.caches)
        seqs.finished = True
        seqs.caches = None

    def stats(self) -> dict:
        return {}


class _Group:
    """The layers that attend to one window (0: every position): one block pool, one table."""

    def __init__(self, window: int, pool: BlockPool):
        self.window, self.pool = window, pool

    def first_needed(self, pos: int, block_size: int) -> int:
        """Index of the first block a query at ``pos`` or later can still read."""
        return max(0, pos - self.window + 1) // block_size if self.window else 0


class PagedKV(ContiguousKV):
    """The same calls on a pool of fixed-size blocks shared by all sequences.

    Graphs (after the paged_kv pass) take ``block_table`` and ``slot_mapping`` instead of
    per-batch caches. With ``prefix_cache``, full blocks of a prompt already in the pool
    (same tokens at the same positions, see kv_pool.py) are reused and only the rest of
    the prompt is computed, by the extend graph.

    Sliding-window layers form a group of their own (one per window): their blocks come
    from their own pool as positions advance (not reserved up front) and go back to it once
    no later query can see them; the table then points those positions at scratch block 0,
    which the window mask hides. So a sliding layer holds at most
    ``ceil(window / block_size) + 1`` blocks per row after prefill, however long the row grows.
    """

    paged = True

    def __init__(self, geometry: CacheGeometry, device, max_seq_len: int, *, num_blocks: int, block_size: int,
                 prefix_cache: bool):
        super().__init__(geometry, device, max_seq_len)
        self.block_size = block_size
        self.prefix_cache = prefix_cache
        windows = geometry.kv_windows()
        item = torch.empty((), dtype=geometry.dtype).element_size()
        self.groups = []
        for w in sorted(set(windows)):  # the signature's table order (phase.PhaseSignature.paged)
            per_block = sum(h * d for (h, d), cw in zip(geometry.kv_shapes(), windows) if cw == w) * item * block_size
            self.groups.append(_Group(w, BlockPool(num_blocks, block_size, per_block)))
        self.pool = self.groups[0].pool  # the full-attention layers' pool when the model has any
        self.sliding = any(g.window for g in self.groups)
        # per layer k, v: [num_blocks, block_size, H, D], zeros (never NaN: masked slots still
        # enter the attention matmul with weight 0)
        self.pools = [torch.zeros(num_blocks, block_size, heads, dim, dtype=geometry.dtype, device=device)
                      for heads, dim in geometry.kv_shapes()]

    def buffers(self, batch: int) -> _DecodeBuffers:
        if batch not in self._decode:
            self._decode[batch] = _DecodeBuffers(batch, self.device, len(self.groups))
        return self._decode[batch]

    def stats(self) -> dict:
        out = {**self.pool.stats(), "bytes": sum(p.numel() * p.element_size() for p in self.pools)}
        if self.sliding:
            out["windows"] = {g.window: g.pool.stats() for g in self.groups}
        return out

    def _ensure(self, seqs: Sequences, row: int, upto: int, sliding: bool = True) -> None:
        """Row ``row`` owns blocks covering positions 0..upto-1 (sliding groups too unless ``sliding=False``)."""
        want = -(-upto // self.block_size)
        for group, blocks in zip(self.groups, seqs.group_blocks):
            if group.window and not sliding:
                continue
            need = want - len(blocks[row])
            if need > 0:
                blocks[row].extend(group.pool.allocate(need))

    def _drop_out_of_window(self, seqs: Sequences, row: int, pos: int) -> None:
        """Give back the sliding groups' blocks no query at ``pos`` or later can read."""
        for group, blocks, dropped in zip(self.groups, seqs.group_blocks, seqs.dropped):
            if not group.window:
                continue
            upto = min(group.first_needed(pos, self.block_size), len(blocks[row]))
            for j in range(dropped[row], upto):
                if blocks[row][j]:
                    group.pool.release([blocks[row][j]])
                    blocks[row][j] = 0
            dropped[row] = max(dropped[row], upto)

    def _tables(self, seqs: Sequences) -> list[torch.Tensor]:
        """block_table [B, M] per group (unused or dropped entries: scratch block 0), one width for
        all groups (the graphs share the dimension); rebuilt only when a row's blocks changed."""
        key = tuple((len(b), d) for blocks, dropped in zip(seqs.group_blocks, seqs.dropped)
                    for b, d in zip(blocks, dropped))
        if seqs.table is None or key != seqs.table_key:
            width = max(len(b) for blocks in seqs.group_blocks for b in blocks)
            seqs.table = [torch.tensor([b + [0] * (width - len(b)) for b in blocks], dtype=torch.long,
                                       device=self.device) for blocks in seqs.group_blocks]
            seqs.table_key = key
        return seqs.table

    def _slots(self, table: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Pool slot of each position ([B] or [B, S]) of each row through its block table."""
        blocks = table.gather(1, (positions // self.block_size).reshape(table.shape[0], -1))
        return (blocks * self.block_size).reshape(positions.shape) + positions % self.block_size

    def lookup_prefix(self, hashes: list[bytes]) -> list[list[int]]:
        """Each group's blocks for the longest cached prefix every group can serve (references taken).

        A full-attention group needs every block of the prefix; a sliding group only the blocks
        the first new token can still see (the others may long have been given back).
        """
        count = len(hashes)
        for group in self.groups:
            if not group.window:  # the longest cached prefix
                count = next((i for i, h in enumerate(hashes[:count]) if not group.pool.cached(h)), count)
            while count and not all(group.pool.cached(h) for h in
                                    hashes[group.first_needed(count * self.block_size, self.block_size):count]):
                count -= 1
        out = []
        for group in self.groups:
            first = group.first_needed(count * self.block_size, self.block_size)
            out.append([0] * first + group.pool.lookup(hashes[first:count]))
        return out

    def start(self, ids: torch.Tensor, lengths: torch.Tensor, max_new_tokens: int, reuse: bool = True) -> Sequences:
        """``reuse=False``: compute every prompt position (no prefix-cache lookup)."""
        batch = ids.shape[0]
        group_blocks = [[[] for _ in range(batch)] for _ in self.groups]
        seqs = Sequences(ids.contiguous(), lengths, lengths.clone(), blocks=group_blocks[0], group_blocks=group_blocks,
                         dropped=[[0] * batch for _ in self.groups])
        try:
            for row, n in enumerate(lengths.tolist()):
                reused = 0
                if self.prefix_cache and reuse:
                    # keep at least one prompt token to compute: it yields the first logits
                    hashes = block_hashes(ids[row, :n].cpu().numpy(), self.block_size, n - 1)
                    for blocks, dropped, hit in zip(group_blocks, seqs.dropped, self.lookup_prefix(hashes)):
                        blocks[row] = hit
                        dropped[row] = hit.count(0)  # a sliding group's leading blocks left its window
                    reused = len(group_blocks[0][row])
                seqs.reused.append(reused * self.block_size)
                self._ensure(seqs, row, n + max_new_tokens, sliding=False)  # full layers: reserve it all
                self._ensure(seqs, row, n)  # sliding layers: the prompt now, the rest as it comes
        except Exception:
            self.finish(seqs)
            raise
        return seqs

    def prefill_inputs(self, seqs: Sequences, phase: str) -> tuple[str, dict]:
        """The prompt's uncached tokens, right-padded; padding writes go to scratch block 0."""
        tables = self._tables(seqs)
        start = torch.tensor(seqs.reused, dtype=torch.long, device=self.device)
        count = seqs.lengths.to(self.device) - start  # new tokens per row (>= 1)
        offsets = torch.arange(int(count.max()), device=self.device).unsqueeze(0)
        valid = offsets < count.unsqueeze(1)
        positions = torch.where(valid, start.unsqueeze(1) + offsets, 0)  # [B, S]
        ids = torch.where(valid, seqs.ids.gather(1, positions.clamp(max=seqs.ids.shape[1] - 1)), 0)
        slots = [torch.where(valid, self._slots(table, positions), 0) for table in tables]
        inputs = {Role.TOKENS: ids, Role.LAST_IDX: count - 1, Role.BLOCK_TABLE: tables, Role.SLOT_MAPPING: slots,
                  Role.POOL: self.pools}
        if phase == "prefill" and any(seqs.reused):
            inputs[Role.POSITIONS] = start
            phase = "extend"
        return phase, inputs

    def after_prefill(self, seqs: Sequences) -> None:
        """Make the prompt's full blocks findable by later prompts (prefix caching), then give back
        what left a sliding window (cached blocks stay findable until their space is needed)."""
        for row, n in enumerate(seqs.lengths.tolist()):
            if self.prefix_cache:
                hashes = block_hashes(seqs.ids[row, :n].cpu().numpy(), self.block_size, n)
                for group, blocks in zip(self.groups, seqs.group_blocks):
                    for block, h in zip(blocks[row], hashes):
                        if block:
                            group.pool.register(block, h)
            self._drop_out_of_window(seqs, row, n)

    def decode_inputs(self, seqs: Sequences, tokens: torch.Tensor) -> dict:
        positions = seqs.pos.tolist()
        if max(positions) + 1 > self.max_seq_len:
            raise CapacityError(f"sequence would exceed max_seq_len={self.max_seq_len}")
        for row, p in enumerate(positions):
            # forward() continues without a reservation; sliding layers take blocks as they go
            if any(p // self.block_size >= len(blocks[row]) for blocks in seqs.group_blocks):
                self._ensure(seqs, row, p + 1)
            if self.sliding:
                self._drop_out_of_window(seqs, row, p)
        tables = self._tables(seqs)
        buf = self.buffers(len(positions))
        buf.ids.copy_(tokens.reshape(-1, 1))
        buf.pos.copy_(seqs.pos)
        for slots, table in zip(buf.slots, tables):
            slots.copy_(self._slots(table, seqs.pos))
        return {Role.TOKENS: buf.ids, Role.POSITIONS: buf.pos, Role.BLOCK_TABLE: tables, Role.SLOT_MAPPING: buf.slots,
                Role.POOL: self.pools}

    def finish(self, seqs: Sequences) -> None:
        if not seqs.finished and seqs.group_blocks is not None:
            self.last_batch_bytes = sum(sum(1 for b in row if b) * g.pool.bytes_per_block
                                        for g, blocks in zip(self.groups, seqs.group_blocks) for row in blocks)
            for group, blocks in zip(self.groups, seqs.group_blocks):
                for row in blocks:
                    group.pool.release([b for b in row if b])
        seqs.finished = True
