"""The drop-in model: HF's generate()/forward() surface over the compiled phase graphs."""

from __future__ import annotations

import logging
import warnings
from typing import Callable

import torch
from transformers import GenerationConfig
from transformers.modeling_outputs import CausalLMOutputWithPast

from .capture import CacheGeometry
from .generation import (
    GenerationTimings,
    pack_left_padded,
    resolve_config,
    resolve_lengths,
    run_generate,
    unsupported_features,
)

logger = logging.getLogger(__name__)

_CAPACITY_STEP = 64  # cache capacity of a call is rounded up to this, to reuse shapes


class CapacityError(ValueError):
    """A request does not fit the limits the model was optimized for."""


class PhaseRunner:
    """Calls the compiled prefill/decode graphs; owns the cache geometry and limits."""

    def __init__(
        self,
        prefill: Callable,
        decode: Callable,
        geometry: CacheGeometry,
        device: torch.device,
        max_batch_size: int,
        max_seq_len: int,
        vocab_size: int,
    ):
        self.prefill_fn, self.decode_fn = prefill, decode
        self.geometry = geometry
        self.device = device
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len
        self.vocab_size = vocab_size

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

    def capacity_for(self, total_len: int) -> int:
        cap = -(-total_len // _CAPACITY_STEP) * _CAPACITY_STEP
        return max(2, min(cap, self.max_seq_len))

    def allocate(self, batch: int, total_len: int) -> list[torch.Tensor]:
        return self.geometry.allocate(batch, self.capacity_for(total_len), self.device)

    # Compiled graphs assume the contiguous layouts they were traced with.
    def prefill(self, ids: torch.Tensor, last_idx: torch.Tensor, caches: list[torch.Tensor]) -> torch.Tensor:
        return self.prefill_fn(ids.contiguous(), last_idx.contiguous(), *caches)

    def decode(self, ids: torch.Tensor, pos: torch.Tensor, caches: list[torch.Tensor]) -> torch.Tensor:
        return self.decode_fn(ids.contiguous(), pos.contiguous(), *caches)


class PdcompileCache:
    """The ``past_key_values`` that :meth:`OptimizedModel.forward` returns and accepts.

    Opaque to the user; holds the cache tensors of one batch and each row's next position.
    """

    def __init__(self, caches: list[torch.Tensor], pos: torch.Tensor):
        self.caches = caches
        self.pos = pos

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self.pos.max())

    @property
    def capacity(self) -> int:
        return self.caches[0].shape[2]


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
        score_factory: Callable[[], Callable] | None = None,
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
        self._score_factory = score_factory
        self._score_fn = None
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
        self.runner.check_ids(input_ids)
        attention_mask = model_kwargs.get("attention_mask")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        elif attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} does not match input_ids {tuple(input_ids.shape)}")
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
        logits_to_keep: int = 0,
        return_dict: bool | None = None,
        **kwargs,
    ):
        """HF-shaped forward: ``logits`` [B, S, V] (or the last ``logits_to_keep``) and a cache.

        Without ``past_key_values`` the call is a prefill of (left-padded) prompts; with
        the cache a previous call returned, ``input_ids`` must be one new token per row.
        Logits at padding positions are zeros.
        """
        unknown = {k: v for k, v in kwargs.items() if v is not None and k not in ("position_ids", "cache_position")}
        if unknown:
            raise NotImplementedError(f"forward() arguments not supported by pdcompile: {sorted(unknown)}")
        if input_ids is None:
            raise ValueError("forward() needs input_ids (inputs_embeds is not supported)")
        self.runner.check_ids(input_ids)
        use_cache = True if use_cache is None else use_cache
        if past_key_values is None:
            logits, cache = self._forward_prefill(input_ids, attention_mask, logits_to_keep)
        elif isinstance(past_key_values, PdcompileCache):
            logits, cache = self._forward_decode(input_ids, past_key_values)
        else:
            raise TypeError(
                f"past_key_values must be the cache a previous call of this model returned, got "
                f"{type(past_key_values).__name__}"
            )
        out = CausalLMOutputWithPast(logits=logits, past_key_values=cache if use_cache else None)
        return out if return_dict is not False else out.to_tuple()

    def _forward_prefill(self, input_ids, attention_mask, logits_to_keep):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        ids_rp, lengths = pack_left_padded(input_ids, attention_mask)
        batch, width = input_ids.shape
        self.runner.check_request(batch, int(lengths.max()), 1)
        caches = self.runner.allocate(batch, int(lengths.max()) + _CAPACITY_STEP)
        last_idx = lengths - 1
        if logits_to_keep == 1:
            logits = self.runner.prefill(ids_rp, last_idx, caches).unsqueeze(1)
        else:
            if self._score_fn is None:
                if self._score_factory is None:
                    raise NotImplementedError(
                        "full-sequence logits need the score graph, which this model does not have "
                        "(loaded bundles carry prefill and decode only); pass logits_to_keep=1"
                    )
                logger.info("building the score graph (all-position logits) on first use")
                self._score_fn = self._score_factory()
            packed = self._score_fn(ids_rp, last_idx, *caches)  # [B, S, V], right-padded
            logits = packed.new_zeros(batch, width, packed.shape[-1])
            seq = packed.shape[1]
            # back to the caller's left-padded layout
            cols = (width - lengths).unsqueeze(1) + torch.arange(seq, device=packed.device).unsqueeze(0)
            valid = torch.arange(seq, device=packed.device).unsqueeze(0) < lengths.unsqueeze(1)
            rows = torch.arange(batch, device=packed.device).unsqueeze(1).expand(batch, seq)
            logits[rows[valid], cols[valid]] = packed[valid]
            if logits_to_keep:
                logits = logits[:, -logits_to_keep:]
        return logits, PdcompileCache(caches, lengths.clone())

    def _forward_decode(self, input_ids, cache: PdcompileCache):
        if input_ids.shape != (cache.pos.shape[0], 1):
            raise NotImplementedError(
                f"with past_key_values, input_ids must be one token per row, shape ({cache.pos.shape[0]}, 1); "
                f"got {tuple(input_ids.shape)} (multi-token continuation is not supported)"
            )
        if int(cache.pos.max()) + 1 > self.runner.max_seq_len:
            raise CapacityError(f"sequence would exceed max_seq_len={self.runner.max_seq_len}")
        if int(cache.pos.max()) >= cache.capacity:
            grown = self.runner.allocate(cache.pos.shape[0], cache.capacity + _CAPACITY_STEP)
            for old, new in zip(cache.caches, grown):
                new[:, :, : old.shape[2]].copy_(old)
            cache.caches = grown
        logits = self.runner.decode(input_ids, cache.pos, cache.caches).unsqueeze(1)
        cache.pos += 1
        return logits, cache
