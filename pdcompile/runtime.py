"""The drop-in model: HF's generate()/forward() surface over the compiled phase graphs."""

from __future__ import annotations

import itertools
import logging
import threading
import warnings
import weakref

import torch
from transformers import GenerationConfig
from transformers.modeling_outputs import CausalLMOutputWithPast

from .capture import CacheGeometry
from .executor import StepExecutor
from .hf_compat import output_cache_field
from .kv_cache import CapacityError, ContiguousKV, Sequences
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

class Runner:
    """What the generate loop and forward() call: limits checked, then KV manager -> step executor.

    The runtime's three parts: :class:`~pdcompile.kv_cache.ContiguousKV` /
    :class:`~pdcompile.kv_cache.PagedKV` own the cache memory and build each step's inputs;
    :class:`~pdcompile.executor.StepExecutor` calls a phase graph on them; :class:`OptimizedModel`
    (below) is the HF-facing surface. This class is the few lines that join them.
    """

    def __init__(self, kv: ContiguousKV, executor: StepExecutor, max_batch_size: int, vocab_size: int):
        self.kv, self.executor = kv, executor
        self.max_batch_size, self.vocab_size = max_batch_size, vocab_size
        # One call at a time: the KV manager's buffers, the block pool and the engines' IO
        # bindings are shared state. Reentrant for a cache finalizer run by the GC inside a call.
        self.lock = threading.RLock()

    @property
    def paged(self) -> bool:
        return self.kv.paged

    @property
    def geometry(self) -> CacheGeometry:
        return self.kv.geometry

    @property
    def device(self) -> torch.device:
        return self.kv.device

    @property
    def max_seq_len(self) -> int:
        return self.kv.max_seq_len

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
    def start(self, ids: torch.Tensor, lengths: torch.Tensor, max_new_tokens: int, reuse: bool = True) -> Sequences:
        """Reserve cache room for prompts ``ids`` (right-padded) plus ``max_new_tokens``
        (``reuse=False``: no prefix-cache hit, every prompt position is computed)."""
        self.check_request(ids.shape[0], int(lengths.max()), max_new_tokens)
        return self.kv.start(ids, lengths, max_new_tokens, reuse)

    def prefill(self, seqs: Sequences, phase: str = "prefill") -> torch.Tensor:
        phase, inputs = self.kv.prefill_inputs(seqs, phase)
        logits = self.executor.run(phase, inputs)
        self.kv.after_prefill(seqs)
        return logits

    def decode(self, seqs: Sequences, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row at ``seqs.pos``; returns the next logits, advances pos."""
        logits = self.executor.run("decode", self.kv.decode_inputs(seqs, tokens))
        seqs.pos += 1
        return logits

    def finish(self, seqs: Sequences) -> None:
        self.kv.finish(seqs)

    def kv_stats(self) -> dict:
        return self.kv.stats()


def _release(runner: Runner, seqs: Sequences) -> None:
    with runner.lock:
        runner.finish(seqs)


class PdcompileCache:
    """The cache (``cache`` / ``past_key_values``) that :meth:`OptimizedModel.forward` returns and accepts.

    Opaque to the user: the batch's cache and each row's next position. Its KV blocks go
    back to the pool on ``release()`` (or leaving a ``with`` block), or else as soon as the
    object is dropped (a finalizer, not ``__del__``: it runs once, also for objects in
    reference cycles, and never keeps the runner alive).
    """

    def __init__(self, runner: Runner, seqs: Sequences):
        self.runner, self.seqs = runner, seqs
        self._finalizer = weakref.finalize(self, _release, runner, seqs)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self.seqs.pos.max())

    def release(self) -> None:
        """Give the KV blocks back now; the cache cannot be used afterwards."""
        self._finalizer()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


class OptimizedModel:
    """What :func:`pdcompile.optimize` returns: the HF model's surface on compiled graphs.

    ``generate()`` and ``model(...)`` behave like the HF model's; ``.config``,
    ``.generation_config``, ``.device`` and ``.dtype`` are the model's.
    ``original_model`` is the wrapped HF model (``None`` for a loaded bundle): features
    the compiled path does not serve run there, with a warning.
    """

    def __init__(
        self,
        runner: Runner,
        config,
        generation_config: GenerationConfig,
        original_model=None,
        report=None,
        backend: str = "",
        graphs: dict | None = None,
        bundle_path=None,
    ):
        self.runner = runner
        self.graphs = graphs  # the transformed phase graphs, for pdcompile.export()
        self.bundle_path = bundle_path  # the compile-cache entry it was served from (no graphs then)
        self.config = config
        self.generation_config = generation_config
        self.original_model = original_model
        self.backend = backend
        self._report = report
        self.last_timings = GenerationTimings()
        self._batch_ids = (f"req_{i}" for i in itertools.count())  # generate_batch's request ids, as HF numbers them

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
        with self.runner.lock:  # concurrent calls run one after the other (shared KV state)
            self.last_timings = GenerationTimings()
            return run_generate(
                self.runner, input_ids, attention_mask, config,
                logits_processor=logits_processor, stopping_criteria=stopping_criteria,
                streamer=streamer, timings=self.last_timings,
            )

    @torch.no_grad()
    def generate_batch(self, inputs: list[list[int]], generation_config: GenerationConfig | None = None,
                       continuous_batching_config=None, record_timestamps: bool = False, progress_bar: bool = False,
                       persistent_manager: bool = False, warmup: bool = True, **kwargs) -> dict:
        """transformers' continuous-batching ``generate_batch``, on :class:`pdcompile.Engine`.

        ``inputs``: prompts as lists of token ids. Returns ``{request_id: GenerationOutput}``
        (transformers' own class) in input order, ids ``req_0``, ``req_1``, ... counted over the
        model's calls, ``num_return_sequences`` children (``req_0__child#0``) before their parent.
        Greedy or sampled (``do_sample``, ``temperature``, ``top_k``, ``top_p`` of the generation
        config), ``max_new_tokens`` (kwarg or config; None: up to ``max_seq_len``), stops at
        the config's (else the model config's) eos ids, the eos included in ``generated_tokens``.
        From ``continuous_batching_config``: ``max_batch_tokens`` (the prefill chunk budget),
        ``max_requests_per_batch``, ``return_logprobs``, ``seed``; its other fields, and
        ``progress_bar`` / ``persistent_manager`` / ``warmup``, are accepted and ignored.
        """
        from .engine import generate_batch

        return generate_batch(self, inputs, generation_config, continuous_batching_config, record_timestamps,
                              progress_bar, persistent_manager, warmup, request_ids=self._batch_ids, **kwargs)

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
        with self.runner.lock:
            return self._forward(input_ids, attention_mask, past_key_values, use_cache, logits_to_keep, return_dict)

    def _forward(self, input_ids, attention_mask, past_key_values, use_cache, logits_to_keep, return_dict):
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
        # every position's logits (score graph): compute the whole prompt, no prefix-cache hit
        seqs = self.runner.start(ids_rp, lengths, 1, reuse=logits_to_keep == 1)
        cache = PdcompileCache(self.runner, seqs)  # owns the blocks from here on
        if logits_to_keep == 1:
            logits = self.runner.prefill(seqs).unsqueeze(1)
        else:
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
        if seqs.finished:
            raise ValueError("this cache was released (cache.release()); start again with a call without a cache")
        if input_ids.shape != (seqs.pos.shape[0], 1):
            raise NotImplementedError(
                f"with past_key_values, input_ids must be one token per row, shape ({seqs.pos.shape[0]}, 1); "
                f"got {tuple(input_ids.shape)} (multi-token continuation is not supported)"
            )
        return self.runner.decode(seqs, input_ids).unsqueeze(1), cache
