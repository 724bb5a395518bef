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
    reused: list[int] = field(default_factory=list)  # prompt tokens served by the prefix cache, per row
    finished: bool = False
    table: torch.Tensor | None = None  # paged: block_table as last sent to the graphs
    table_key: tuple = ()  # paged: blocks per row when ``table`` was built


class _DecodeBuffers:
    """Persistent decode inputs of one batch size: what a CUDA-graph bucket would capture."""

    def __init__(self, batch: int, device):
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(batch, dtype=torch.long, device=device)
        self.slots = torch.zeros(batch, dtype=torch.long, device=device)


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

    def start(self, ids: torch.Tensor, lengths: torch.Tensor, max_new_tokens: int) -> Sequences:
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


class PagedKV(ContiguousKV):
    """The same calls on a pool of fixed-size blocks shared by all sequences.

    Graphs (after the paged_kv pass) take ``block_table`` and ``slot_mapping`` instead of
    per-batch caches. With ``prefix_cache``, full blocks of a prompt already in the pool
    (same tokens at the same positions, see kv_pool.py) are reused and only the rest of
    the prompt is computed, by the extend graph.
    """

    paged = True

    def __init__(self, geometry: CacheGeometry, device, max_seq_len: int, *, num_blocks: int, block_size: int,
                 prefix_cache: bool):
        super().__init__(geometry, device, max_seq_len)
        self.block_size = block_size
        self.prefix_cache = prefix_cache
        self.pool = BlockPool(num_blocks, block_size, geometry.bytes_per_token() * block_size)
        # per layer k, v: [num_blocks, block_size, H, D], zeros (never NaN: masked slots still
        # enter the attention matmul with weight 0)
        self.pools = [torch.zeros(num_blocks, block_size, heads, dim, dtype=geometry.dtype, device=device)
                      for heads, dim in geometry.kv_shapes()]

    def stats(self) -> dict:
        return {**self.pool.stats(), "bytes": sum(p.numel() * p.element_size() for p in self.pools)}

    def _ensure(self, seqs: Sequences, row: int, upto: int) -> None:
        """Row ``row`` owns blocks covering positions 0..upto-1."""
        need = -(-upto // self.block_size) - len(seqs.blocks[row])
        if need > 0:
            seqs.blocks[row].extend(self.pool.allocate(need))

    def _table(self, seqs: Sequences) -> torch.Tensor:
        """block_table [B, M] (unused entries: scratch block 0); rebuilt only when a row got new blocks."""
        key = tuple(len(b) for b in seqs.blocks)
        if seqs.table is None or key != seqs.table_key:
            width = max(key)
            rows = [b + [0] * (width - len(b)) for b in seqs.blocks]
            seqs.table, seqs.table_key = torch.tensor(rows, dtype=torch.long, device=self.device), key
        return seqs.table

    def _slots(self, table: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Pool slot of each position ([B] or [B, S]) of each row through its block table."""
        blocks = table.gather(1, (positions // self.block_size).reshape(table.shape[0], -1))
        return (blocks * self.block_size).reshape(positions.shape) + positions % self.block_size

    def start(self, ids: torch.Tensor, lengths: torch.Tensor, max_new_tokens: int) -> Sequences:
        seqs = Sequences(ids.contiguous(), lengths, lengths.clone(), blocks=[[] for _ in range(ids.shape[0])])
        try:
            for row, n in enumerate(lengths.tolist()):
                reused = []
                if self.prefix_cache:
                    # keep at least one prompt token to compute: it yields the first logits
                    hashes = block_hashes(ids[row, :n].cpu().numpy(), self.block_size, n - 1)
                    reused = self.pool.lookup(hashes)
                seqs.blocks[row] = list(reused)
                seqs.reused.append(len(reused) * self.block_size)
                self._ensure(seqs, row, n + max_new_tokens)
        except Exception:
            self.finish(seqs)
            raise
        return seqs

    def prefill_inputs(self, seqs: Sequences, phase: str) -> tuple[str, dict]:
        """The prompt's uncached tokens, right-padded; padding writes go to scratch block 0."""
        table = self._table(seqs)
        start = torch.tensor(seqs.reused, dtype=torch.long, device=self.device)
        count = seqs.lengths.to(self.device) - start  # new tokens per row (>= 1)
        offsets = torch.arange(int(count.max()), device=self.device).unsqueeze(0)
        valid = offsets < count.unsqueeze(1)
        positions = torch.where(valid, start.unsqueeze(1) + offsets, 0)  # [B, S]
        ids = torch.where(valid, seqs.ids.gather(1, positions.clamp(max=seqs.ids.shape[1] - 1)), 0)
        slots = torch.where(valid, self._slots(table, positions), 0)
        inputs = {Role.TOKENS: ids, Role.LAST_IDX: count - 1, Role.BLOCK_TABLE: table, Role.SLOT_MAPPING: slots,
                  Role.POOL: self.pools}
        if phase == "prefill" and any(seqs.reused):
            inputs[Role.POSITIONS] = start
            phase = "extend"
        return phase, inputs

    def after_prefill(self, seqs: Sequences) -> None:
        """Make the prompt's full blocks findable by later prompts (prefix caching)."""
        if not self.prefix_cache:
            return
        for row, n in enumerate(seqs.lengths.tolist()):
            hashes = block_hashes(seqs.ids[row, :n].cpu().numpy(), self.block_size, n)
            for block, h in zip(seqs.blocks[row], hashes):
                self.pool.register(block, h)

    def decode_inputs(self, seqs: Sequences, tokens: torch.Tensor) -> dict:
        positions = seqs.pos.tolist()
        if max(positions) + 1 > self.max_seq_len:
            raise CapacityError(f"sequence would exceed max_seq_len={self.max_seq_len}")
        for row, p in enumerate(positions):
            if p // self.block_size >= len(seqs.blocks[row]):  # forward() continues without a reservation
                self._ensure(seqs, row, p + 1)
        table = self._table(seqs)
        buf = self.buffers(len(positions))
        buf.ids.copy_(tokens.reshape(-1, 1))
        buf.pos.copy_(seqs.pos)
        buf.slots.copy_(self._slots(table, seqs.pos))
        return {Role.TOKENS: buf.ids, Role.POSITIONS: buf.pos, Role.BLOCK_TABLE: table, Role.SLOT_MAPPING: buf.slots,
                Role.POOL: self.pools}

    def finish(self, seqs: Sequences) -> None:
        if not seqs.finished and seqs.blocks is not None:
            self.last_batch_bytes = sum(len(b) for b in seqs.blocks) * self.pool.bytes_per_block
            for blocks in seqs.blocks:
                self.pool.release(blocks)
        seqs.finished = True
