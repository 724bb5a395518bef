"""The phase contract as one typed object: what each phase graph takes and returns.

Capture makes a :class:`PhaseSignature` for every graph it exports; the paged_kv pass
returns an updated one (caches become pools plus a block table and a slot mapping).
Everything downstream reads roles and dynamic dimensions from it -- the passes (through
:class:`~pdcompile.passes.PassContext`), the cost estimate, the backends' export shapes,
the bundle manifest and the runtime -- instead of parsing placeholder names.

The phases themselves are one table (:data:`PHASES`): a new phase (a speculative
"verify", a mixed batch) is one :class:`PhaseSpec` entry plus its capture module.

Shapes name their dynamic dimensions; integers are static::

    prefill(tokens[batch, seq], last_idx[batch], cache_i[batch, H, capacity, D]...) -> logits[batch, V]
    decode (tokens[batch, 1],   positions[batch], ...)                              -> logits[batch, V]
    extend (tokens[batch, seq], positions[batch], last_idx[batch], ...)             -> logits[batch, V]
    score  (tokens[batch, seq], last_idx[batch], ...)                               -> logits[batch, seq, V]

    paged: cache_i -> block_table[batch, blocks_per_seq], slot_mapping[batch(, seq)],
                      pool_i[pool_blocks, block_size, H, D]
           (one block_table/slot_mapping pair per distinct sliding window, see paged())
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .config import CacheConfig, PassConfig, QuantConfig


class Role(str, enum.Enum):
    TOKENS = "tokens"  # input_ids
    LAST_IDX = "last_idx"  # [B] index of each row's last real token (prefill, extend, score)
    POSITIONS = "positions"  # [B] position of each row's first new token (decode, extend)
    CACHE = "cache"  # contiguous KV cache [B, H, T, D], written in place
    BLOCK_TABLE = "block_table"  # paged: [B, M] pool blocks of each row, in position order
    SLOT_MAPPING = "slot_mapping"  # paged: pool slot of each new token
    POOL = "pool"  # paged KV pool [N, block_size, H, D], written in place
    LOGITS = "logits"


STATE_ROLES = (Role.CACHE, Role.POOL)  # inputs a phase updates in place


@dataclass(frozen=True)
class TensorSpec:
    name: str
    role: Role
    dtype: torch.dtype
    shape: tuple  # str: a dynamic dimension (see DIMS); int: static
    # KV inputs of sliding-window layers: the window their attention reads (0: every position).
    # Paged: each window has its own block table and slot mapping, so blocks that left the
    # window can go back to the pool.
    window: int = 0

    def to_dict(self) -> dict:
        d = {"name": self.name, "role": self.role.value, "dtype": str(self.dtype).replace("torch.", ""),
             "shape": list(self.shape)}
        if self.window:
            d["window"] = self.window
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TensorSpec":
        return cls(d["name"], Role(d["role"]), getattr(torch, d["dtype"]), tuple(d["shape"]), d.get("window", 0))


@dataclass(frozen=True)
class PhaseSpec:
    """One phase: how many query tokens a row feeds and which per-row inputs it takes."""

    name: str
    query: str | int  # "seq" (a prompt or chunk) or 1 (decode)
    row_inputs: tuple[Role, ...]  # after TOKENS, before the KV state
    logits: tuple  # output shape
    doc: str


PHASES: dict[str, PhaseSpec] = {
    p.name: p
    for p in (
        PhaseSpec("prefill", "seq", (Role.LAST_IDX,), ("batch", "vocab"), "the prompt from position 0; last token's logits"),
        PhaseSpec("decode", 1, (Role.POSITIONS,), ("batch", "vocab"), "one token per row at positions[b]"),
        PhaseSpec("extend", "seq", (Role.POSITIONS, Role.LAST_IDX), ("batch", "vocab"),
                  "new tokens after a cached prefix (prefix cache, chunked prefill)"),
        PhaseSpec("score", "seq", (Role.LAST_IDX,), ("batch", "seq", "vocab"), "prefill returning every position's logits"),
    )
}

# Input names the graphs carry (names are for people and file formats; code reads roles).
_ROLE_NAMES = {Role.TOKENS: "input_ids", Role.LAST_IDX: "last_idx", Role.BLOCK_TABLE: "block_table",
               Role.SLOT_MAPPING: "slot_mapping"}


def _row_input_name(phase: str, role: Role) -> str:
    if role is Role.POSITIONS:
        return "start" if phase == "extend" else "pos"
    return _ROLE_NAMES[role]


@dataclass(frozen=True)
class PhaseSignature:
    phase: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    # ------------------------------------------------------------------ construction
    @classmethod
    def contiguous(cls, phase: str, geometry) -> "PhaseSignature":
        """The signature capture exports ``phase`` with: one contiguous cache per k and v."""
        spec = PHASES[phase]
        ids = TensorSpec("input_ids", Role.TOKENS, torch.int64, ("batch", spec.query))
        rows = tuple(TensorSpec(_row_input_name(phase, r), r, torch.int64, ("batch",)) for r in spec.row_inputs)
        caches = tuple(
            TensorSpec(f"caches_{i}", Role.CACHE, geometry.dtype, ("batch", heads, "capacity", dim), window)
            for i, ((heads, dim), window) in enumerate(zip(geometry.kv_shapes(), geometry.kv_windows()))
        )
        logits = TensorSpec("logits", Role.LOGITS, geometry.dtype, spec.logits)
        return cls(phase, (ids, *rows, *caches), (logits,))

    def paged(self, block_size: int) -> "PhaseSignature":
        """Caches -> one pool per cache, and a block table and slot mapping per window (the paged_kv pass).

        Layers of one window share a table (full-attention layers: window 0, listed first); a
        sliding window's table drops blocks that left the window, so the tables differ.
        """
        query = PHASES[self.phase].query
        plain = tuple(s for s in self.inputs if s.role not in STATE_ROLES)
        caches = self.of(Role.CACHE)
        groups = []
        for w in sorted({s.window for s in caches}):
            suffix = f"_w{w}" if w else ""
            groups += [TensorSpec(f"block_table{suffix}", Role.BLOCK_TABLE, torch.int64, ("batch", "blocks_per_seq"), w),
                       TensorSpec(f"slot_mapping{suffix}", Role.SLOT_MAPPING, torch.int64,
                                  ("batch",) if query == 1 else ("batch", query), w)]
        pools = tuple(
            TensorSpec(f"pool_{i}", Role.POOL, s.dtype, ("pool_blocks", block_size, s.shape[1], s.shape[3]), s.window)
            for i, s in enumerate(caches)
        )
        return replace(self, inputs=(*plain, *groups, *pools))

    @property
    def windows(self) -> list[int]:
        """The KV groups' windows, in the order of their block tables (paged) or caches' first use."""
        return sorted({s.window for s in self.inputs if s.role in STATE_ROLES})

    # ------------------------------------------------------------------ queries
    def of(self, role: Role) -> list[TensorSpec]:
        return [s for s in self.inputs if s.role is role]

    def index(self, role: Role) -> int:
        """Position of the (single) input with ``role``."""
        found = [i for i, s in enumerate(self.inputs) if s.role is role]
        if len(found) != 1:
            raise KeyError(f"the {self.phase} signature has {len(found)} inputs with role {role.value}")
        return found[0]

    def has(self, role: Role) -> bool:
        return any(s.role is role for s in self.inputs)

    @property
    def is_paged(self) -> bool:
        return self.has(Role.POOL)

    @property
    def block_size(self) -> int | None:
        pools = self.of(Role.POOL)
        return int(pools[0].shape[1]) if pools else None

    def is_state(self, i: int) -> bool:
        return self.inputs[i].role in STATE_ROLES

    def nodes(self, gm: torch.fx.GraphModule) -> dict[Role, list[torch.fx.Node]]:
        """The graph's placeholders by role (the graph's inputs are the signature's, in order)."""
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        if len(placeholders) != len(self.inputs):
            raise ValueError(
                f"the {self.phase} graph has {len(placeholders)} inputs but its signature lists {len(self.inputs)}"
            )
        out: dict[Role, list[torch.fx.Node]] = {r: [] for r in Role}
        for node, spec in zip(placeholders, self.inputs):
            out[spec.role].append(node)
        return out

    def node(self, gm: torch.fx.GraphModule, role: Role) -> torch.fx.Node | None:
        found = self.nodes(gm)[role]
        return found[0] if found else None

    # ------------------------------------------------------------------ export
    def export_dims(self, max_batch_size: int, max_seq_len: int) -> tuple:
        """``dynamic_shapes`` for ``torch.export`` (one dict per input, in order)."""
        dims = export_dims(max_batch_size, max_seq_len)
        return tuple({axis: dims[d] for axis, d in enumerate(s.shape) if isinstance(d, str)} for s in self.inputs)

    def to_dict(self) -> dict:
        return {"phase": self.phase, "inputs": [s.to_dict() for s in self.inputs],
                "outputs": [s.to_dict() for s in self.outputs]}

    @classmethod
    def from_dict(cls, d: dict) -> "PhaseSignature":
        return cls(d["phase"], tuple(TensorSpec.from_dict(s) for s in d["inputs"]),
                   tuple(TensorSpec.from_dict(s) for s in d["outputs"]))


def export_dims(max_batch_size: int, max_seq_len: int) -> dict[str, torch.export.Dim]:
    """The dynamic dimensions, one definition for capture and every re-export.

    Ranges: the batch is never narrower than 3, because export examples use a batch of 3
    (a size-1 or size-2 example would be specialised or tied to another dim).
    """
    return {
        "batch": torch.export.Dim("batch", min=1, max=max(max_batch_size, 3)),
        "seq": torch.export.Dim("seq", min=1, max=max_seq_len),
        "capacity": torch.export.Dim("capacity", min=2, max=max(max_seq_len, 3)),
        "blocks_per_seq": torch.export.Dim("kv_blocks_per_seq", min=1, max=max(max_seq_len, 2)),
        "pool_blocks": torch.export.Dim("kv_pool_blocks", min=2),
    }


@dataclass(frozen=True, eq=False)
class RepeatedLayers:
    """A phase graph captured with a few of the model's decoder layers, for a backend that
    lowers them once and repeats one of them (see capture.repeated_layers).

    The graph holds the layers ``kept`` of ``num_layers`` (the first, two from the middle,
    the last), numbered 0..len(kept)-1 in it. The backend makes layers kept[2]+1 ..
    num_layers-2 from the lowered layer 2 with each layer's own weights (``params``, the
    model's parameters and buffers by name), and ``signature`` is the whole model's.
    """

    num_layers: int
    kept: tuple[int, ...]
    path: str  # the decoder layers' ModuleList in the model, e.g. "model.layers"
    params: dict  # model FQN -> tensor
    signature: PhaseSignature | None = None  # the whole model's (None until the pipeline has run)

    @property
    def weight_pattern(self) -> str:
        """The names the phase graph's decoder-layer weights have (group 1: the layer, 2: the
        name inside it); the graph's module holds the model as ``model``."""
        return r"^model\." + re.escape(self.path) + r"\.(\d+)\.(.+)$"

    def full(self, signature: PhaseSignature, geometry) -> "RepeatedLayers":
        """This plan with the whole model's version of ``signature`` (a truncated graph's)."""
        whole = PhaseSignature.contiguous(signature.phase, geometry)
        if signature.is_paged:
            whole = whole.paged(signature.block_size)
        return replace(self, signature=whole)


@dataclass(frozen=True)
class PassContext:
    """What a pass or a backend knows about the phase graph it is given (Torch-TensorRT's
    ``(gm, settings)``): the phase, its signature, the capacity and KV layout, which passes
    are on, and where graph dumps go. Frozen: a pass that changes the signature returns the
    new one in its :class:`~pdcompile.passes.PassResult` and the manager makes the next context.
    """

    phase: str
    signature: PhaseSignature
    cache: "CacheConfig"  # max_seq_len resolved (never None here)
    passes: "PassConfig"
    device: torch.device = torch.device("cpu")
    dump_dir: str | None = None
    quant: "QuantConfig | None" = None  # weight-only quantization (None: off)
    matmul_dtype: torch.dtype | None = None  # the linear layers' compute dtype (None: the model's)
    layers: RepeatedLayers | None = None  # the graph holds a few layers of the model (None: all)

    @property
    def max_batch_size(self) -> int:
        return self.cache.max_batch_size

    @property
    def model_signature(self) -> PhaseSignature:
        """The signature of the engine the backend makes: the whole model's where the graph
        holds only some of its layers."""
        return self.layers.signature if self.layers is not None else self.signature

    @property
    def max_seq_len(self) -> int:
        return self.cache.max_seq_len

    @classmethod
    def make(cls, signature: PhaseSignature, *, max_batch_size: int = 8, max_seq_len: int = 256,
             block_size: int = 16, disabled=(), device="cpu") -> "PassContext":
        """A context for running passes by hand (tests, custom pipelines)."""
        from .config import CacheConfig, PassConfig

        cache = CacheConfig(max_batch_size=max_batch_size, max_seq_len=max_seq_len, block_size=block_size)
        return cls(signature.phase, signature, cache, PassConfig(disabled=frozenset(disabled)), torch.device(device))

    def with_signature(self, signature: PhaseSignature) -> "PassContext":
        return replace(self, signature=signature)

    def for_phase(self, phase: str, signature: PhaseSignature) -> "PassContext":
        return replace(self, phase=phase, signature=signature)
