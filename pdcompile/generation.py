"""The generate() loop: HF semantics, one prefill call and one decode call per token.

The loop is ours (not GenerationMixin's) so that a decode step is a single graph
call plus a handful of tensor ops: no per-step input preparation, no mask
concatenation, no cache object bookkeeping. What it must reproduce from HF:

* a GenerationConfig (the model's, or the one passed) updated by the kwargs;
* ``max_length`` counts the (padded) prompt, ``max_new_tokens`` takes precedence;
* ``eos_token_id`` (one or several): a finished row keeps emitting ``pad_token_id``;
  ``pad_token_id`` defaults to the first eos id;
* logits processors in HF's order (penalties, length constraints, then the sampling
  warpers temperature, top-k, top-p, min-p, typical, epsilon, eta);
* sampling by ``torch.multinomial`` on the softmax, so ``torch.manual_seed`` makes it
  reproducible; greedy by ``argmax``;
* streamers: the prompt first, then each new token, then ``end()``;
* ``return_dict_in_generate`` with ``scores`` / ``logits``.

Anything else (beam search, assisted decoding, ...) is listed by
:func:`unsupported_features` and the caller decides what to do with it.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from dataclasses import dataclass

import torch
from transformers import GenerationConfig
from transformers.generation import (
    GenerateDecoderOnlyOutput,
    LogitsProcessorList,
    StoppingCriteriaList,
)
from transformers.generation import logits_process as lp
from transformers.generation.configuration_utils import GenerationMode

logger = logging.getLogger(__name__)

# Model kwargs generate() accepts besides the GenerationConfig fields.
_MODEL_KWARGS = {"input_ids", "attention_mask", "use_cache", "position_ids"}


def resolve_config(base: GenerationConfig, generation_config, kwargs: dict) -> tuple[GenerationConfig, dict, bool]:
    """HF's precedence: kwargs > the passed config > the model's config > global defaults.

    Returns the config, the kwargs that are not config fields (model inputs), and whether
    ``max_length`` is HF's default (which means "20 new tokens", not 20 in total).
    """
    has_default_max_length = (
        kwargs.get("max_length") is None
        and (generation_config is None or generation_config.max_length is None)
        and base.max_length is None
    )
    config = copy.deepcopy(generation_config if generation_config is not None else GenerationConfig())
    defaults = getattr(base, "_get_default_generation_params", None)
    if defaults is not None:
        config.update(**base.to_dict(), defaults_only=True, allow_custom_entries=True)
        config.update(**defaults(), defaults_only=True)
    elif generation_config is None:  # older transformers: the model's config is the base
        config = copy.deepcopy(base)
    model_kwargs = config.update(**kwargs)
    return config, model_kwargs, has_default_max_length


def resolve_lengths(config: GenerationConfig, prompt_len: int, has_default_max_length: bool, max_positions) -> None:
    """HF's _prepare_generated_length: turn max/min_new_tokens into total lengths."""
    if config.max_new_tokens is None and config.max_length is None:  # HF adds None to the prompt length
        raise TypeError(
            "max_length=None without max_new_tokens: pass an int, or leave max_length out for the default "
            "(20 new tokens)"
        )
    if config.max_new_tokens is not None:
        config.max_length = config.max_new_tokens + prompt_len
    elif has_default_max_length:  # HF: by default, 20 new tokens
        config.max_length = config.max_length + prompt_len
        if max_positions is not None:
            config.max_length = min(config.max_length, max_positions)
    if config.min_new_tokens is not None:
        config.min_length = config.min_new_tokens + prompt_len


def check_config(config: GenerationConfig) -> None:
    """Refuse None where HF's generate() computes with the field (it fails there with a bare TypeError).

    A None that works here but not on the HF model would make the drop-in one-way.
    """
    for name in ("num_return_sequences", "num_beams"):
        if getattr(config, name, 1) is None:
            raise TypeError(f"{name}=None: pass an int, or leave {name} out for the default (1)")
    n = config.num_return_sequences
    if n > 1 and not isinstance(n, int):  # HF fails in repeat_interleave (greedy: in validate())
        raise TypeError(f"num_return_sequences must be an int, got {n!r}")


def unsupported_features(config: GenerationConfig, model_kwargs: dict, extra: dict) -> list[str]:
    """Names of what this loop does not implement; empty when the compiled path serves the call."""
    found = []
    mode = config.get_generation_mode(extra.get("assistant_model"))
    if mode not in (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE):
        found.append(f"generation mode {mode.value!r}")
    checks = {
        "guidance_scale": lambda v: v not in (None, 1, 1.0),
        "sequence_bias": lambda v: v is not None,
        "exponential_decay_length_penalty": lambda v: v is not None,
        "watermarking_config": lambda v: v is not None,
        "top_h": lambda v: v is not None,
        "renormalize_logits": lambda v: bool(v),
        "stop_strings": lambda v: v is not None,
        "output_attentions": lambda v: bool(v),
        "output_hidden_states": lambda v: bool(v),
        "dola_layers": lambda v: v is not None,
        "prompt_lookup_num_tokens": lambda v: v is not None,
        "token_healing": lambda v: bool(v),
    }
    for name, active in checks.items():
        if active(getattr(config, name, None)):
            found.append(name)
    for name, value in extra.items():
        if value is not None:
            found.append(name)
    for name in model_kwargs:
        if name not in _MODEL_KWARGS:
            found.append(name)
    if model_kwargs.get("use_cache") is False:
        found.append("use_cache=False")
    return found


def model_inputs(runner, input_ids, attention_mask, config: GenerationConfig | None = None):
    """Check ``input_ids`` / ``attention_mask`` and return them as the graphs take them.

    The ids become int64 here, once: HF accepts int32 ids (embedding takes both) and returns
    int64 sequences, while the exported graphs (onnxruntime) take int64 only. Without a
    mask, generate() (``config`` given) infers it from the pad id as HF does; forward()
    attends to every token.
    """
    if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2 and input_ids.shape[0] == 0:
        raise ValueError(f"input_ids is an empty batch, shape {tuple(input_ids.shape)}: pass at least one prompt")
    runner.check_ids(input_ids)
    input_ids = input_ids.to(torch.long)
    if attention_mask is None and config is not None:
        return input_ids, infer_attention_mask(input_ids, config)
    return input_ids, check_attention_mask(attention_mask, input_ids)


def check_attention_mask(attention_mask, input_ids: torch.Tensor) -> torch.Tensor:
    """The mask as int64 ones and zeros, the shape and device of ``input_ids``; ones when None.

    HF takes any 2-D mask and reads it both as a boolean (attention) and as counts (its
    position ids are the mask's cumulative sum): a mask of 2s or 0.5s, or an additive
    0/-inf mask, silently gives wrong positions there. Only 0 and 1 are meaningful, so
    anything else is refused.
    """
    if attention_mask is None:
        return torch.ones_like(input_ids)
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a torch.Tensor, got {type(attention_mask).__name__}")
    if attention_mask.dtype.is_complex:
        raise TypeError(f"attention_mask must hold 0 and 1 (integer, bool or float), got {attention_mask.dtype}")
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask shape {tuple(attention_mask.shape)} does not match input_ids {tuple(input_ids.shape)}"
        )
    if attention_mask.device != input_ids.device:
        raise ValueError(
            f"attention_mask is on {attention_mask.device} but input_ids is on {input_ids.device}; "
            "move it with .to(model.device)"
        )
    bad = (attention_mask != 0) & (attention_mask != 1)
    if bool(bad.any()):
        value = attention_mask[bad][0].item()
        raise ValueError(
            f"attention_mask must hold only 0 (padding) and 1 (token), found {value}; "
            "pass the tokenizer's mask, not an additive or weighted one"
        )
    return attention_mask.to(torch.long)


def infer_attention_mask(input_ids: torch.Tensor, config: GenerationConfig) -> torch.Tensor:
    """HF's mask when generate() gets none: tokens equal to ``pad_token_id`` are padding.

    HF does this only when a pad id is set, occurs in the prompt and is not an eos id
    (_prepare_attention_mask_for_generation). Where those pad tokens are not left padding
    HF masks holes, which the compiled path cannot do: refuse, saying where the mask came from.
    """
    ones = torch.ones_like(input_ids)
    pad = config.pad_token_id
    if pad is None or not bool((input_ids == pad).any()):
        return ones
    eos = [] if config.eos_token_id is None else torch.as_tensor(config.eos_token_id).reshape(-1).tolist()
    if pad in eos:
        return ones
    mask = (input_ids != pad).to(torch.long)
    try:
        pack_left_padded(input_ids, mask)
    except ValueError as e:
        raise ValueError(
            f"no attention_mask was passed, so, as in HF, every token equal to pad_token_id={pad} is padding; "
            f"in this prompt that is not left padding ({e}). Pass the tokenizer's attention_mask."
        ) from None
    return mask


def as_list(value, cls, name: str):
    """A user's logits processors / stopping criteria as ``cls``.

    HF takes any list or tuple here (it merges them into its own list class), so a plain
    ``[MyCriteria()]`` must work too.
    """
    if value is None or isinstance(value, cls):
        return value
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{name} must be a list of callables, got {type(value).__name__}")
    for item in value:
        if not callable(item):
            raise TypeError(f"{name} must be a list of callables, got an item of type {type(item).__name__}")
    return cls(value)


def _merge(default: LogitsProcessorList, user: LogitsProcessorList) -> LogitsProcessorList:
    """HF's rule: a user processor of the same type as a built-in one takes its place; the rest follow."""
    out = LogitsProcessorList()
    for proc in default:
        same = next((u for u in user if type(u) is type(proc)), None)
        out.append(same if same is not None else proc)
    out.extend(u for u in user if not any(u is o for o in out))
    return out


def _tensor_or_none(value, device) -> torch.Tensor | None:
    if value is None:
        return None
    t = torch.as_tensor(value, dtype=torch.long, device=device)
    return t.reshape(-1)


def build_logits_processor(
    config: GenerationConfig,
    prompt_len: int,
    attention_mask: torch.Tensor,
    eos: torch.Tensor | None,
    user: LogitsProcessorList | None,
    device,
) -> LogitsProcessorList:
    """The processors HF's GenerationMixin would build for the supported options, same order."""
    procs = LogitsProcessorList()
    if config.repetition_penalty is not None and config.repetition_penalty != 1.0:
        padding = (attention_mask != 0).int().argmax(dim=1)
        procs.append(lp.RepetitionPenaltyLogitsProcessor(config.repetition_penalty, prompt_ignore_length=padding))
    if config.no_repeat_ngram_size is not None and config.no_repeat_ngram_size > 0:
        procs.append(lp.NoRepeatNGramLogitsProcessor(config.no_repeat_ngram_size))
    if config.bad_words_ids is not None:
        procs.append(lp.NoBadWordsLogitsProcessor(config.bad_words_ids, eos))
    if config.min_length is not None and eos is not None and config.min_length > 0:
        procs.append(lp.MinLengthLogitsProcessor(config.min_length, eos, device=device))
    if config.min_new_tokens is not None and eos is not None and config.min_new_tokens > 0:
        procs.append(lp.MinNewTokensLengthLogitsProcessor(prompt_len, config.min_new_tokens, eos, device=device))
    if config.forced_bos_token_id is not None:
        procs.append(lp.ForcedBOSTokenLogitsProcessor(config.forced_bos_token_id))
    if config.forced_eos_token_id is not None:
        procs.append(lp.ForcedEOSTokenLogitsProcessor(config.max_length, config.forced_eos_token_id, device=device))
    if config.remove_invalid_values is True:
        procs.append(lp.InfNanRemoveLogitsProcessor())
    if config.suppress_tokens is not None:
        procs.append(lp.SuppressTokensLogitsProcessor(config.suppress_tokens, device=device))
    if config.begin_suppress_tokens is not None:
        procs.append(lp.SuppressTokensAtBeginLogitsProcessor(config.begin_suppress_tokens, prompt_len, device=device))
    if user:
        procs = _merge(procs, user)
    if config.do_sample:
        keep = 1
        if config.temperature is not None and config.temperature != 1.0:
            procs.append(lp.TemperatureLogitsWarper(config.temperature))
        if config.top_k is not None and config.top_k != 0:
            procs.append(lp.TopKLogitsWarper(top_k=config.top_k, min_tokens_to_keep=keep))
        if config.top_p is not None and config.top_p < 1.0:
            procs.append(lp.TopPLogitsWarper(top_p=config.top_p, min_tokens_to_keep=keep))
        if config.min_p is not None:
            procs.append(lp.MinPLogitsWarper(min_p=config.min_p, min_tokens_to_keep=keep))
        if config.typical_p is not None and config.typical_p < 1.0:
            procs.append(lp.TypicalLogitsWarper(mass=config.typical_p, min_tokens_to_keep=keep))
        if config.epsilon_cutoff is not None and 0.0 < config.epsilon_cutoff < 1.0:
            procs.append(lp.EpsilonLogitsWarper(epsilon=config.epsilon_cutoff, min_tokens_to_keep=keep))
        if config.eta_cutoff is not None and 0.0 < config.eta_cutoff < 1.0:
            procs.append(lp.EtaLogitsWarper(epsilon=config.eta_cutoff, min_tokens_to_keep=keep, device=device))
    return procs


@dataclass
class GenerationTimings:
    """Wall-clock of the last generate() call: prefill (TTFT) and each decode step."""

    ttft_s: float = 0.0
    decode_s: tuple[float, ...] = ()
    reused_tokens: tuple[int, ...] = ()  # prompt tokens per row served by the prefix cache

    @property
    def tpot_s(self) -> float:
        """Median decode step time (seconds per output token after the first)."""
        if not self.decode_s:
            return float("nan")
        s = sorted(self.decode_s)
        return s[len(s) // 2]


def pack_left_padded(input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """Left-padded [B, L] prompts -> right-padded [B, S] prompts, lengths [B].

    Raises on masks that are not left padding (holes, right padding): HF's decoder-only
    generation is only defined for left padding, and guessing would change outputs.
    """
    batch, width = input_ids.shape
    mask = attention_mask.to(torch.bool)
    lengths = mask.sum(dim=1)
    if bool((lengths == 0).any()):
        row = int((lengths == 0).nonzero()[0, 0])
        raise ValueError(f"row {row} of the batch is an empty prompt (attention_mask all zeros); every prompt needs at least one token")
    cols = torch.arange(width, device=input_ids.device)
    expected = cols.unsqueeze(0) >= (width - lengths).unsqueeze(1)
    if not torch.equal(mask, expected):
        raise ValueError(
            "attention_mask is not left padding (zeros then ones in every row). Decoder-only generation needs "
            "left-padded batches: set tokenizer.padding_side = 'left'."
        )
    seq = int(lengths.max())
    start = (width - lengths).unsqueeze(1)
    idx = (start + torch.arange(seq, device=input_ids.device).unsqueeze(0)).clamp(max=width - 1)
    return input_ids.gather(1, idx), lengths


def run_generate(
    runner,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    config: GenerationConfig,
    logits_processor: LogitsProcessorList | None = None,
    stopping_criteria: StoppingCriteriaList | None = None,
    streamer=None,
    timings: GenerationTimings | None = None,
):
    """Greedy or sampled generation over the runner's prefill and decode graphs."""
    logits_processor = as_list(logits_processor, LogitsProcessorList, "logits_processor")
    stopping_criteria = as_list(stopping_criteria, StoppingCriteriaList, "stopping_criteria")
    device = input_ids.device
    batch, prompt_len = input_ids.shape
    if prompt_len >= config.max_length:  # HF's check and message (_validate_generated_length)
        raise ValueError(
            f"Input length of input_ids is {prompt_len}, but `max_length` is set to {config.max_length}. "
            "This can lead to unexpected behavior. You should consider increasing `max_length` or, better yet, "
            "setting `max_new_tokens`."
        )
    # HF stops once the length reaches max_length, which may be a float (max_new_tokens=4.0, 4.5):
    # the number of new tokens is the ceiling of the difference.
    max_new = math.ceil(config.max_length - prompt_len)

    eos = _tensor_or_none(config.eos_token_id, device)
    pad = config.pad_token_id
    if pad is None and eos is not None:
        if eos.numel() == 0:  # HF takes an empty list as "no eos" only when it needs no pad from it
            raise ValueError(
                "eos_token_id is an empty list and pad_token_id is not set; pass eos_token_id=None for no "
                "end-of-sequence token, or a pad_token_id"
            )
        if batch > 1:
            logger.warning("Setting pad_token_id to eos_token_id:%d for open-end generation.", int(eos[0]))
        pad = int(eos[0])
    if isinstance(pad, (list, tuple)):
        pad = pad[0]

    ids_rp, lengths = pack_left_padded(input_ids, attention_mask)
    procs = build_logits_processor(config, prompt_len, attention_mask, eos, logits_processor, device)
    want_scores = config.return_dict_in_generate and config.output_scores
    want_logits = config.return_dict_in_generate and config.output_logits

    seq = torch.empty(batch, prompt_len + max_new, dtype=input_ids.dtype, device=device)
    seq[:, :prompt_len] = input_ids
    cur = prompt_len
    if streamer is not None:
        streamer.put(input_ids.cpu())

    # Token emission times: TTFT is the first minus the start, TPOT the gaps between them
    # (whole steps: graph call, processors, sampling, bookkeeping).
    emitted = []
    t0 = time.perf_counter()
    seqs = runner.start(ids_rp, lengths, max_new)
    try:
        sequences, scores, raw_logits = _loop(
            runner, seqs, seq, cur, config, procs, eos, pad, stopping_criteria, streamer,
            want_scores, want_logits, max_new, emitted,
        )
    finally:
        runner.finish(seqs)
    if timings is not None:
        timings.ttft_s = emitted[0] - t0
        timings.decode_s = tuple(b - a for a, b in zip(emitted, emitted[1:]))
        timings.reused_tokens = tuple(seqs.reused)
    if streamer is not None:
        streamer.end()
    if config.return_dict_in_generate:
        return GenerateDecoderOnlyOutput(
            sequences=sequences,
            scores=tuple(scores) if want_scores else None,
            logits=tuple(raw_logits) if want_logits else None,
        )
    return sequences


@contextlib.contextmanager
def _one_thread():
    """Run the per-step logits work on the calling thread only.

    A processor touches the whole ``[B, vocab]`` row a few times (clone, where, isin):
    above 32768 elements (SmolLM2's 49152-token vocab) each op is an OpenMP parallel
    region, and after each region libgomp's workers spin-wait for more work, ~10 ms of
    CPU each here. In HF eager the next op is torch's again and picks the spinning
    workers up; here the next thing is the graph, which on onnxruntime has its own
    threads, so a spinning worker takes one of the cores the graph needs: measured
    on 2 cores, ``MinNewTokensLengthLogitsProcessor`` over 49152 logits costs 31 ms of
    CPU per call (0.9 ms on one thread), and a SmolLM2 decode step +6.5 ms
    (benchmarks/processors.py measures it). The work itself is under a millisecond on one
    thread, and a second thread barely shortens it.
    ``torch.set_num_threads`` costs ~0.25 us. It is process-wide: torch work in another
    Python thread during these microseconds also runs on one thread (slower, never wrong).
    """
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _select(logits, ids, config, procs, scores, raw_logits, want_scores, want_logits) -> torch.Tensor:
    """One step's next tokens [B] from the graph's logits [B, V]: processors, then argmax or sampling."""
    next_logits = logits.to(torch.float32)
    next_scores = procs(ids, next_logits) if procs else next_logits
    if want_scores:
        scores.append(next_scores)
    if want_logits:
        raw_logits.append(next_logits)
    if config.do_sample:
        probs = torch.softmax(next_scores, dim=-1)
        return torch.multinomial(probs, num_samples=1).squeeze(1)
    return torch.argmax(next_scores, dim=-1)


def _loop(runner, seqs, seq, cur, config, procs, eos, pad, stopping_criteria, streamer,
          want_scores, want_logits, max_new, emitted):
    """Prefill, then one decode step per token; fills ``seq`` from column ``cur``."""
    batch = seq.shape[0]
    scores, raw_logits = [], []
    unfinished = torch.ones(batch, dtype=torch.bool, device=seq.device)
    logits = runner.prefill(seqs)
    deadline = time.perf_counter() + config.max_time if config.max_time is not None else None
    for step in range(max_new):
        with _one_thread():
            next_tokens = _select(logits, seq[:, :cur], config, procs, scores, raw_logits, want_scores, want_logits)
        if eos is not None:
            next_tokens = torch.where(unfinished, next_tokens, torch.full_like(next_tokens, pad))
        seq[:, cur] = next_tokens
        cur += 1
        emitted.append(time.perf_counter())
        if streamer is not None:
            streamer.put(next_tokens.cpu())
        if eos is not None:
            unfinished &= ~torch.isin(next_tokens, eos)
        if stopping_criteria:
            unfinished &= ~stopping_criteria(seq[:, :cur], tuple(scores) if want_scores else None)
        if step == max_new - 1 or not bool(unfinished.any()):
            break
        if deadline is not None and time.perf_counter() > deadline:
            break
        logits = runner.decode(seqs, next_tokens)
    return seq[:, :cur], scores, raw_logits
