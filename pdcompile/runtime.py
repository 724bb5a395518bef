"""The drop-in model: HF's generate()/forward() surface over the compiled phase graphs."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
from transformers import GenerationConfig
from transformers.modeling_outputs import CausalLMOutputWithPast

from .capture import CacheGeometry
from .hf_compat import output_cache_field
from .kv_pool import BlockPool, block_hashes
from .generation import (
    GenerationTimings,
    check_config,
    model_inputs,
    pack_left_padded,
    resolve_config,
    resolve_lengths,
    run_generate,
    unsupported_features,
)

logger = logging.getLogger(__name__)

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


class PhaseRunner:
    """Calls the compiled graphs on a contiguous per-batch cache; owns the geometry and limits.

    The generate loop and forward() talk to a runner through ``start / prefill / decode /
    finish``; :class:`PagedRunner` implements the same calls on a block pool.
    """

    paged = False

    def __init__(
        self,
        phases: dict[str, Callable],
        geometry: CacheGeometry,
        device: torch.device,
        max_batch_size: int,
        max_seq_len: int,
        vocab_size: int,
        lazy_phases: dict[str, Callable[[], Callable]] | None = None,
    ):
        self.phases = dict(phases)
        self.lazy = dict(lazy_phases or {})
        self.geometry = geometry
        self.device = device
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len
        self.vocab_size = vocab_size

    def phase(self, name: str) -> Callable:
        if name not in self.phases:
            if name not in self.lazy:
                raise NotImplementedError(
                    f"the {name} graph is not available here (bundles carry prefill and decode only)"
                )
            logger.info("building the %s graph on first use (one-time)", name)
            self.phases[name] = self.lazy.pop(name)()
        return self.phases[name]

    # ------------------------------------------------------------------ checks
    def check_request(self, batch: int, prompt_len: int, max_new_tokens: int) -> None:
        if batch > self.max_batch_size:
            raise CapacityError(
                f"batch of {batch} sequences exceeds max_batch_size={self.max_batch_size}; "
                "pass a larger max_batch_size to pdcompile.optimize()"
            )
        total = prompt_len + max_new_tokens
        if total > self.max_seq_len:
            raise CapacityError(
                f"prompt of {prompt_len} tokens + max_new_tokens={max_new_tokens} = {total} tokens exceeds "
                f"max_seq_len={self.max_seq_len}; shorten the prompt, lower max_new_tokens, or pass a larger "
                "max_seq_len to pdcompile.optimize()"
            )

    def check_ids(self, input_ids: torch.Tensor) -> None:
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"input_ids must be an integer tensor (torch.long), got {input_ids.dtype}")
        if input_ids.device != self.device:
            raise ValueError(f"input_ids is on {input_ids.device} but the model is on {self.device}; move it with .to(model.device)")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        if input_ids.shape[1] == 0:
            raise ValueError("empty prompt: input_ids has 0 tokens; every prompt needs at least one token")
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= self.vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {self.vocab_size - 1}]")

    # ------------------------------------------------------------------ batch lifecycle
    def start(self, ids: torch.Tensor, lengths: torch.Tensor, max_new_tokens: int) -> Sequences:
        """Reserve cache room for prompts ``ids`` (right-padded) plus ``max_new_tokens``."""
        self.check_request(ids.shape[0], int(lengths.max()), max_new_tokens)
        cap = -(-(int(lengths.max()) + max_new_tokens) // _CAPACITY_STEP) * _CAPACITY_STEP
        cap = max(2, min(cap, self.max_seq_len))
        caches = self.geometry.allocate(ids.shape[0], cap, self.device)
        return Sequences(ids.contiguous(), lengths, lengths.clone(), caches=caches, reused=[0] * ids.shape[0])

    # Compiled graphs assume the contiguous layouts they were traced with.
    def prefill(self, seqs: Sequences, phase: str = "prefill") -> torch.Tensor:
        return self.phase(phase)(seqs.ids, (seqs.lengths - 1).contiguous(), *seqs.caches)

    def decode(self, seqs: Sequences, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row at ``seqs.pos``; returns the next logits, advances pos."""
        if int(seqs.pos.max()) >= seqs.caches[0].shape[2]:
            self._grow(seqs)
        logits = self.phase("decode")(tokens.reshape(-1, 1).contiguous(), seqs.pos, *seqs.caches)
        seqs.pos += 1
        return logits

    def _grow(self, seqs: Sequences) -> None:
        if int(seqs.pos.max()) + 1 > self.max_seq_len:
            raise CapacityError(f"sequence would exceed max_seq_len={self.max_seq_len}")
        old = seqs.caches
        cap = min(old[0].shape[2] + _CAPACITY_STEP, self.max_seq_len)
        seqs.caches = self.geometry.allocate(old[0].shape[0], cap, self.device)
        for o, n in zip(old, seqs.caches):
            n[:, :, : o.shape[2]].copy_(o)

    def finish(self, seqs: Sequences) -> None:
        seqs.finished = True
        seqs.caches = None


class PagedRunner(PhaseRunner):
    """The same calls on a KV pool of fixed-size blocks shared by all sequences.

    Graphs (after the paged_kv pass) take ``block_table`` and ``slot_mapping`` instead of
    per-batch caches. With ``prefix_cache``, full blocks of a prompt already in the pool
    (same tokens at the same positions, see kv_pool.py) are reused and only the rest of
    the prompt is computed, by the extend graph.
    """

    paged = True

    def __init__(self, *args, num_blocks: int, block_size: int, prefix_cache: bool, **kwargs):
        super().__init__(*args, **kwargs)
        self.block_size = block_size
        self.prefix_cache = prefix_cache
        bytes_per_block = self.geometry.bytes_per_token() * block_size
        self.pool = BlockPool(num_blocks, block_size, bytes_per_block)
        self.pools = []  # per layer k, v: [num_blocks, block_size, H, D], zeros (never NaN)
        for g in self.geometry.layers:
            for d in (g.head_dim, g.v_head_dim):
                self.pools.append(torch.zeros(num_blocks, block_size, g.kv_heads, d, dtype=self.geometry.dtype, device=self.device))

    def kv_stats(self) -> dict:
        return {**self.pool.stats(), "bytes": sum(p.numel() * p.element_size() for p in self.pools)}

    def _slot(self, seqs: Sequences, row: int, pos: int) -> int:
        return seqs.blocks[row][pos // self.block_size] * self.block_size + pos % self.block_size

    def _ensure(self, seqs: Sequences, row: int, upto: int) -> None:
        """Row ``row`` owns blocks covering positions 0..upto-1."""
        need = -(-upto // self.block_size) - len(seqs.blocks[row])
        if need > 0:
            seqs.blocks[row].extend(self.pool.allocate(need))

    def _table(self, seqs: Sequences) -> torch.Tensor:
        """block_table [B, M]; rebuilt only when a row got new blocks."""
        key = tuple(len(b) for b in seqs.blocks)
        if seqs.table is None or key != seqs.table_key:
            width = max(key)
            table = torch.zeros(len(seqs.blocks), width, dtype=torch.long)
            for row, blocks in enumerate(seqs.blocks):
                table[row, : len(blocks)] = torch.tensor(blocks)
            seqs.table, seqs.table_key = table.to(self.device), key
        return seqs.table

    def start(self, ids: torch.Tensor, lengths: torch.Tensor, max_new_tokens: int) -> Sequences:
        self.check_request(ids.shape[0], int(lengths.max()), max_new_tokens)
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

    def prefill(self, seqs: Sequences, phase: str = "prefill") -> torch.Tensor:
        lengths = seqs.lengths.tolist()
        start = seqs.reused
        table = self._table(seqs)
        use_extend = any(start) and phase == "prefill"
        width = max(n - s for n, s in zip(lengths, start))
        ids = torch.zeros(len(lengths), width, dtype=seqs.ids.dtype, device=self.device)
        slots = torch.zeros(len(lengths), width, dtype=torch.long)  # padding -> scratch block 0
        for row, (n, s) in enumerate(zip(lengths, start)):
            ids[row, : n - s] = seqs.ids[row, s:n]
            for i in range(n - s):
                slots[row, i] = self._slot(seqs, row, s + i)
        slots = slots.to(self.device)
        last = torch.tensor([n - s - 1 for n, s in zip(lengths, start)], device=self.device)
        if use_extend:
            starts = torch.tensor(start, device=self.device)
            logits = self.phase("extend")(ids, starts, last, table, slots, *self.pools)
        else:
            logits = self.phase(phase)(ids, last, table, slots, *self.pools)
        if self.prefix_cache:
            self._register_prompt_blocks(seqs)
        return logits

    def _register_prompt_blocks(self, seqs: Sequences) -> None:
        for row, n in enumerate(seqs.lengths.tolist()):
            hashes = block_hashes(seqs.ids[row, :n].cpu().numpy(), self.block_size, n)
            for block, h in zip(seqs.blocks[row], hashes):
                self.pool.register(block, h)

    def decode(self, seqs: Sequences, tokens: torch.Tensor) -> torch.Tensor:
        positions = seqs.pos.tolist()
        if max(positions) + 1 > self.max_seq_len:
            raise CapacityError(f"sequence would exceed max_seq_len={self.max_seq_len}")
        for row, p in enumerate(positions):
            if p // self.block_size >= len(seqs.blocks[row]):  # forward() continues without a reservation
                self._ensure(seqs, row, p + 1)
        table = self._table(seqs)
        rows = torch.arange(len(positions), device=self.device)
        slots = table[rows, seqs.pos // self.block_size] * self.block_size + seqs.pos % self.block_size
        logits = self.phase("decode")(tokens.reshape(-1, 1).contiguous(), seqs.pos, table, slots, *self.pools)
        seqs.pos += 1
        return logits

    def finish(self, seqs: Sequences) -> None:
        if not seqs.finished and seqs.blocks is not None:
            for blocks in seqs.blocks:
                self.pool.release(blocks)
        seqs.finished = True


class PdcompileCache:
    """The ``past_key_values`` that :meth:`OptimizedModel.forward` returns and accepts.

    Opaque to the user: the batch's cache and each row's next position. With the paged
    cache, its blocks go back to the pool when this object is garbage collected.
    """

    def __init__(self, runner: PhaseRunner, seqs: Sequences):
        self.runner, self.seqs = runner, seqs

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self.seqs.pos.max())

    def __del__(self):
        try:
            self.runner.finish(self.seqs)
        except Exception:  # interpreter shutdown: nothing left to return blocks to
            pass


class OptimizedModel:
    """What :func:`pdcompile.optimize` returns: the HF model's surface on compiled graphs.

    ``generate()`` and ``model(...)`` behave like the HF model's; ``.config``,
    ``.generation_config``, ``.device`` and ``.dtype`` are the model's.
    ``original_model`` is the wrapped HF model (``None`` for a loaded bundle): features
    the compiled path does not serve run there, with a warning.
    """

    def __init__(
        self,
        runner: PhaseRunner,
        config,
        generation_config: GenerationConfig,
        original_model=None,
        report=None,
        backend: str = "",
        graphs: dict | None = None,
    ):
        self.runner = runner
        self.graphs = graphs  # the transformed phase graphs, for pdcompile.export()
        self.config = config
        self.generation_config = generation_config
        self.original_model = original_model
        self.backend = backend
        self._report = report
        self.last_timings = GenerationTimings()

    # ------------------------------------------------------------------ HF surface
    @property
    def device(self) -> torch.device:
        return self.runner.device

    @property
    def dtype(self) -> torch.dtype:
        return self.runner.geometry.dtype

    def eval(self):
        return self

    def can_generate(self) -> bool:
        return True

    def pdcompile_report(self):
        """Per phase: the passes that ran, their matches, node counts, FLOPs and bytes."""
        return self._report

    def __repr__(self):
        return f"OptimizedModel({type(self.config).__name__}, backend={self.backend!r}, max_batch_size={self.runner.max_batch_size}, max_seq_len={self.runner.max_seq_len})"

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    # ------------------------------------------------------------------ generate
    @torch.no_grad()
    def generate(
        self,
        inputs: torch.Tensor | None = None,
        generation_config: GenerationConfig | None = None,
        logits_processor=None,
        stopping_criteria=None,
        prefix_allowed_tokens_fn=None,
        synced_gpus=None,
        assistant_model=None,
        streamer=None,
        negative_prompt_ids=None,
        negative_prompt_attention_mask=None,
        **kwargs,
    ):
        config, model_kwargs, default_max_length = resolve_config(self.generation_config, generation_config, kwargs)
        input_ids = inputs if inputs is not None else model_kwargs.get("input_ids")
        extra = {
            "assistant_model": assistant_model,
            "prefix_allowed_tokens_fn": prefix_allowed_tokens_fn,
            "synced_gpus": synced_gpus or None,
            "negative_prompt_ids": negative_prompt_ids,
            "negative_prompt_attention_mask": negative_prompt_attention_mask,
        }
        missing = unsupported_features(config, model_kwargs, extra)
        if input_ids is None:
            missing.append("generation without input_ids")
        if missing:
            return self._fallback_generate(
                missing, inputs, generation_config, logits_processor, stopping_criteria,
                prefix_allowed_tokens_fn, synced_gpus, assistant_model, streamer,
                negative_prompt_ids, negative_prompt_attention_mask, kwargs,
            )
        config.validate()
        check_config(config)
        input_ids, attention_mask = model_inputs(self.runner, input_ids, model_kwargs.get("attention_mask"), config)
        resolve_lengths(config, input_ids.shape[1], default_max_length, getattr(self.config, "max_position_embeddings", None))
        n = config.num_return_sequences or 1
        if n > 1:
            input_ids = input_ids.repeat_interleave(n, dim=0)
            attention_mask = attention_mask.repeat_interleave(n, dim=0)
        self.last_timings = GenerationTimings()
        return run_generate(
            self.runner, input_ids, attention_mask, config,
            logits_processor=logits_processor, stopping_criteria=stopping_criteria,
            streamer=streamer, timings=self.last_timings,
        )

    def _fallback_generate(self, missing, inputs, generation_config, logits_processor, stopping_criteria,
                           prefix_allowed_tokens_fn, synced_gpus, assistant_model, streamer,
                           negative_prompt_ids, negative_prompt_attention_mask, kwargs):
        what = ", ".join(missing)
        if self.original_model is None:
            raise NotImplementedError(
                f"generate() with {what} is not served by pdcompile's compiled graphs, and this model was loaded "
                "from a bundle without the original HF model to fall back to."
            )
        warnings.warn(
            f"pdcompile: generate() with {what} is not served by the compiled graphs; running the original "
            "HF model (no speed-up for this call).",
            stacklevel=3,
        )
        return self.original_model.generate(
            inputs, generation_config=generation_config, logits_processor=logits_processor,
            stopping_criteria=stopping_criteria, prefix_allowed_tokens_fn=prefix_allowed_tokens_fn,
            synced_gpus=synced_gpus, assistant_model=assistant_model, streamer=streamer,
            negative_prompt_ids=negative_prompt_ids,
            negative_prompt_attention_mask=negative_prompt_attention_mask, **kwargs,
        )

    # ------------------------------------------------------------------ forward
    @torch.no_grad()
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: PdcompileCache | None = None,
        use_cache: bool | None = None,
        cache: PdcompileCache | None = None,
        logits_to_keep: int = 0,
        return_dict: bool | None = None,
        **kwargs,
    ):
        """HF-shaped forward: ``logits`` [B, S, V] (or the last ``logits_to_keep``) and a cache.

        Without ``past_key_values`` the call is a prefill of (left-padded) prompts; with
        the cache a previous call returned, ``input_ids`` must be one new token per row.
        Logits at padding positions are zeros. The cache goes in and comes out under the name
        the installed transformers uses (``cache``, ``past_key_values`` before 5.24); either
        name is accepted.
        """
        if cache is not None and past_key_values is not None:
            raise ValueError("pass the cache as `cache=` or `past_key_values=`, not both")
        past_key_values = cache if cache is not None else past_key_values
        unknown = {k: v for k, v in kwargs.items() if v is not None and k not in ("position_ids", "cache_position")}
        if unknown:
            raise NotImplementedError(f"forward() arguments not supported by pdcompile: {sorted(unknown)}")
        if input_ids is None:
            raise ValueError("forward() needs input_ids (inputs_embeds is not supported)")
        # the mask is read by the prefill only: a decode step continues the cache's rows
        input_ids, attention_mask = model_inputs(self.runner, input_ids, attention_mask if past_key_values is None else None)
        use_cache = True if use_cache is None else use_cache
        if past_key_values is None:
            logits, new_cache = self._forward_prefill(input_ids, attention_mask, logits_to_keep)
        elif isinstance(past_key_values, PdcompileCache):
            logits, new_cache = self._forward_decode(input_ids, past_key_values)
        else:
            raise TypeError(
                f"past_key_values must be the cache a previous call of this model returned, got "
                f"{type(past_key_values).__name__}"
            )
        field = output_cache_field(CausalLMOutputWithPast)
        out = CausalLMOutputWithPast(logits=logits, **{field: new_cache if use_cache else None})
        return out if return_dict is not False else out.to_tuple()

    def _forward_prefill(self, input_ids, attention_mask, logits_to_keep):
        ids_rp, lengths = pack_left_padded(input_ids, attention_mask)
        batch, width = input_ids.shape
        seqs = self.runner.start(ids_rp, lengths, 1)
        cache = PdcompileCache(self.runner, seqs)  # owns the blocks from here on
        if logits_to_keep == 1:
            logits = self.runner.prefill(seqs).unsqueeze(1)
        else:
            seqs.reused = [0] * batch  # every position's logits: compute the whole prompt
            packed = self.runner.prefill(seqs, phase="score")  # [B, S, V], right-padded
            logits = packed.new_zeros(batch, width, packed.shape[-1])
            seq = packed.shape[1]
            # back to the caller's left-padded layout
            cols = (width - lengths).unsqueeze(1) + torch.arange(seq, device=packed.device).unsqueeze(0)
            valid = torch.arange(seq, device=packed.device).unsqueeze(0) < lengths.unsqueeze(1)
            rows = torch.arange(batch, device=packed.device).unsqueeze(1).expand(batch, seq)
            logits[rows[valid], cols[valid]] = packed[valid]
            if logits_to_keep:
                logits = logits[:, -logits_to_keep:]
        return logits, cache

    def _forward_decode(self, input_ids, cache: PdcompileCache):
        seqs = cache.seqs
        if input_ids.shape != (seqs.pos.shape[0], 1):
            raise NotImplementedError(
                f"with past_key_values, input_ids must be one token per row, shape ({seqs.pos.shape[0]}, 1); "
                f"got {tuple(input_ids.shape)} (multi-token continuation is not supported)"
            )
        return self.runner.decode(seqs, input_ids).unsqueeze(1), cache
