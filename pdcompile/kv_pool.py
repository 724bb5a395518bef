"""Block bookkeeping for the paged KV cache: allocation, reference counts, prefix cache.

Only integers live here; the pool tensors belong to the runner. Block 0 is reserved as
scratch: padding positions of a batch write there, so they can never land in a block
another sequence owns.

Prefix caching: a full block of prompt tokens is identified by a hash chain,
``h_i = sha256(h_{i-1} || tokens of block i)``, so equal hashes mean the same tokens at
the same positions. Registered blocks stay in the pool after their sequence ends
(reference count 0, least-recently-used order) until the space is needed.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np


class KVPoolExhausted(RuntimeError):
    """More KV blocks were needed than the pool holds."""


def format_bytes(n: float) -> str:
    """A size a person can read: small test pools are KiB, real ones MiB or GiB."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def block_hashes(tokens, block_size: int, limit: int) -> list[bytes]:
    """Hash chain over the full blocks of ``tokens[:limit]``."""
    out, prev = [], b""
    arr = np.asarray(tokens, dtype=np.int64)
    for i in range(limit // block_size):
        prev = hashlib.sha256(prev + arr[i * block_size:(i + 1) * block_size].tobytes()).digest()
        out.append(prev)
    return out


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, bytes_per_block: int = 0):
        if num_blocks < 2:
            raise ValueError(f"a KV pool needs at least 2 blocks (one is scratch), got {num_blocks}")
        self.num_blocks, self.block_size, self.bytes_per_block = num_blocks, block_size, bytes_per_block
        self.free = list(range(num_blocks - 1, 0, -1))  # pop() hands out low ids first
        self.refs = [0] * num_blocks
        self.hash_of: dict[int, bytes] = {}
        self.block_of: dict[bytes, int] = {}
        self.evictable: OrderedDict[int, None] = OrderedDict()  # cached, unreferenced, LRU first

    # ------------------------------------------------------------------ allocation
    def available(self) -> int:
        return len(self.free) + len(self.evictable)

    def allocate(self, n: int) -> list[int]:
        if n > self.available():
            usable = self.num_blocks - 1
            raise KVPoolExhausted(
                f"the KV pool is out of blocks: {n} more needed, {self.available()} free of {usable} "
                f"({self.block_size}-token blocks, {format_bytes(usable * self.bytes_per_block)}); pass a larger "
                "kv_cache_memory= (bytes) to pdcompile.optimize(), or "
                "config=OptimizeConfig(cache=CacheConfig(kv_cache_blocks=...)), or run fewer / shorter sequences at once"
            )
        out = []
        for _ in range(n):
            if not self.free:
                block, _ = self.evictable.popitem(last=False)  # least recently used cached block
                del self.block_of[self.hash_of.pop(block)]
                self.free.append(block)
            block = self.free.pop()
            self.refs[block] = 1
            out.append(block)
        return out

    def release(self, blocks) -> None:
        for block in blocks:
            if self.refs[block] <= 0:
                raise RuntimeError(f"KV block {block} released more often than it was taken")
            self.refs[block] -= 1
            if self.refs[block] == 0:
                if block in self.hash_of:
                    self.evictable[block] = None
                else:
                    self.free.append(block)

    # ------------------------------------------------------------------ prefix cache
    def lookup(self, hashes: list[bytes]) -> list[int]:
        """Blocks of the longest cached prefix of ``hashes``; each gets a reference."""
        hit = []
        for h in hashes:
            block = self.block_of.get(h)
            if block is None:
                break
            hit.append(block)
        for block in hit:
            if self.refs[block] == 0:
                self.evictable.pop(block, None)
            self.refs[block] += 1
        return hit

    def cached(self, h: bytes) -> bool:
        return h in self.block_of

    def register(self, block: int, h: bytes) -> None:
        """Make a full, never-again-written block findable by its hash."""
        if h in self.block_of or block in self.hash_of:
            return
        self.block_of[h] = block
        self.hash_of[block] = h

    def stats(self) -> dict:
        used = sum(1 for r in self.refs[1:] if r > 0)
        return {"blocks": self.num_blocks - 1, "in_use": used, "cached": len(self.evictable),
                "free": len(self.free), "block_size": self.block_size}
