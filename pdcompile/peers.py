"""The peer systems ``pdcompile bench`` compares against.

Each peer wraps one way of running greedy generation on a Hugging Face causal LM that a
user could pick instead of pdcompile, behind one small interface::

    peer = Peer(model)
    seconds = peer.prepare()                      # one-time setup / compile (+ a warm-up run)
    sequences, token_times = peer.generate(input_ids, attention_mask, max_new_tokens)

``prepare`` optionally takes the request the benchmark will time
(``prepare(input_ids, attention_mask, max_new_tokens)``) so that a compiling peer
compiles for those shapes during setup, not inside the first timed run.

``sequences`` is what ``model.generate(..., do_sample=False)`` returns (prompt + new
tokens, left-padded batches included) and ``token_times[i]`` the ``time.perf_counter()``
at which new token ``i`` became available: the first is the end of prefill, so the caller
gets TTFT from its own start time and TPOT from the gaps.

Why each one is a fair comparison:

* :class:`HFEager` -- ``model.generate`` as shipped: dynamic cache, eager PyTorch. The
  baseline every user starts from, and the reference the others must match token for token.

* :class:`HFStaticCompile` -- the recipe transformers documents for fast generation
  ("Static kv-cache and torch.compile", docs/source/en/llm_optims.md)::

      model.generation_config.cache_implementation = "static"
      model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)

  In transformers 5.x ``generate`` can also compile the decode step on its own when the
  cache is static (``get_compiled_call`` with a ``CompileConfig``), but
  ``_valid_auto_compile_criteria`` only allows that on cuda/xpu/neuron/tpu, or with the
  private ``CompileConfig._compile_all_devices`` flag ("for testing purposes"). On CPU
  the documented ``torch.compile(model.forward)`` is therefore what compiles; it compiles
  the prefill and the decode step (inductor; "reduce-overhead" adds CUDA graphs on GPU
  and is a no-op on CPU). The peer works on a shallow copy of the model (shared weights,
  own attributes), so the caller's model stays eager.

* :class:`ExportersOnnx` -- transformers' own exporter to ONNX Runtime
  (``transformers.exporters``): ``OnnxExporter().export_for_generation`` runs one short
  ``generate`` to capture the prefill and decode calls, exports each with dynamic shapes,
  and ``ExportedModel.to()`` opens one ONNX Runtime session per graph. The loop here is
  the one the exporter leaves to its user: prefill on the prompt, then one decode call
  per token, feeding back the cache the previous call returned. The runner binds inputs
  and outputs in place (IO binding, outputs handed over through DLPack; its
  ``share_inputs``/``share_outputs`` flags only matter when replaying a CUDA graph), so
  the cache goes from one call to the next without host copies; the decode graph itself
  appends to the cache (a dynamic cache, the exporter's default). ONNX Runtime gets
  torch's thread count. Costs the export imposes and that stay in the numbers: the
  prefill graph computes logits for every prompt position, and each decode step copies
  the cache into its grown output.

Token times are taken at the same point for every peer: once the new token is known
(after the argmax and the EOS bookkeeping), as HF's streamer sees it.
"""

from __future__ import annotations

import copy
import time
from abc import ABC, abstractmethod

import torch
from transformers import DynamicCache
from transformers.generation.configuration_utils import GenerationMode

from .hf_compat import CACHE_ARG_NAMES, cache_arg, output_cache
from .generation import build_logits_processor, resolve_config, resolve_lengths
from .timing import TimingStreamer


def warmup_prompt(model, batch: int = 1, length: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """A small deterministic prompt (no padding) for ``prepare()`` when the caller gives none."""
    vocab = model.config.get_text_config(decoder=True).vocab_size
    ids = 3 + torch.arange(batch * length, device=model.device).reshape(batch, length) * 7 % (vocab - 3)
    return ids, torch.ones_like(ids)


def compiled_graph_count() -> int:
    """Graphs TorchDynamo has compiled so far in this process (all torch.compile calls)."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


class Peer(ABC):
    """The interface; subclasses implement ``generate`` and, if they need one, ``_setup``."""

    name: str = "peer"
    # True: EOS does not end generation (bench's ignore_eos), so every system produces the
    # same number of tokens; HF's generate gets eos_token_id=None, which adds no processor.
    ignore_eos: bool = False

    def __init__(self, model):
        self.model = model

    def _setup(self) -> None:
        """One-time work before the first generate (compile, export, ...)."""

    def prepare(self, input_ids=None, attention_mask=None, max_new_tokens: int = 16) -> float:
        """Set up, then run one warm-up generate; returns the seconds both took.

        Pass the request the benchmark will time: a compiling peer compiles for the shapes
        it sees (batch size, cache length), so warming up on other shapes would leave the
        compilation inside the first timed run. Without a prompt, :func:`warmup_prompt`.
        """
        if input_ids is None:
            input_ids, attention_mask = warmup_prompt(self.model)
        start = time.perf_counter()
        self._setup()
        self.generate(input_ids, attention_mask, max_new_tokens)
        return time.perf_counter() - start

    @abstractmethod
    def generate(self, input_ids, attention_mask, max_new_tokens: int) -> tuple[torch.LongTensor, list[float]]:
        """Greedy generation: (HF generate's sequences, perf_counter() time of each new token)."""


class HFEager(Peer):
    """``model.generate(do_sample=False)``, timed by a streamer."""

    name = "hf-eager"

    def __init__(self, model):
        super().__init__(model)
        self.generating_model = model

    def generate(self, input_ids, attention_mask, max_new_tokens):
        # TimingStreamer skips the first put() (the prompt) and records perf_counter()
        # at every later one: one per new token, right after HF picked it.
        streamer = TimingStreamer()
        extra = {"eos_token_id": None} if self.ignore_eos else {}
        sequences = self.generating_model.generate(
            input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
            do_sample=False, streamer=streamer, **extra,
        )
        return sequences, streamer.token_times


class HFStaticCompile(HFEager):
    """HF's static-cache + ``torch.compile(model.forward)`` recipe, on a shallow copy of the model.

    ``graphs_compiled`` is how many graphs TorchDynamo compiled during ``prepare()``. With
    ``fullgraph=True`` nothing falls back to eager silently: a graph break, or going past
    Dynamo's recompile limit (``torch._dynamo.config.recompile_limit``, 8 graphs per code
    object, i.e. per model class across all instances), raises instead. A new batch size
    or a longer cache is a new static cache shape, hence a recompilation, as HF's docs warn.
    """

    name = "hf-static-compile"

    def __init__(self, model):
        super().__init__(model)
        self.graphs_compiled = 0

    def _setup(self):
        # copy.copy gives a new module object whose attribute dict is its own (the
        # submodules and weights are shared, not duplicated): setting forward and
        # generation_config on it, and what generate() stores on the model
        # (_previous_max_cache_length), leaves the caller's model untouched and eager.
        clone = copy.copy(self.model)
        clone.generation_config = copy.deepcopy(self.model.generation_config)
        clone.generation_config.cache_implementation = "static"
        clone.forward = torch.compile(clone.forward, mode="reduce-overhead", fullgraph=True)
        self.generating_model = clone

    def prepare(self, input_ids=None, attention_mask=None, max_new_tokens: int = 16) -> float:
        # The warm-up generate is where inductor compiles (prefill and decode graphs).
        before = compiled_graph_count()
        seconds = super().prepare(input_ids, attention_mask, max_new_tokens)
        self.graphs_compiled = compiled_graph_count() - before
        return seconds


# What the greedy loop below feeds the exported graphs: generate()'s own inputs for a
# decoder-only model. An export that traced anything else is refused in _setup.
_FED_INPUTS = {"input_ids", "attention_mask", "position_ids", *CACHE_ARG_NAMES}


class ExportersOnnx(Peer):
    """``transformers.exporters`` to ONNX Runtime: exported prefill and decode graphs, our greedy loop.

    ``ort_fusions`` is ``OnnxConfig.ort_fusions`` (e.g. ``"cpu"``): ONNX Runtime's fused
    ops (attention, rotary, norms). Off by default: with it, left-padded rows decode wrong
    tokens (checked on the tiny llama: the first token matches HF, the next ones do not),
    so a fused peer refuses padded batches rather than return them.
    """

    name = "exporters-onnx"

    def __init__(self, model, ort_fusions: str | None = None):
        super().__init__(model)
        self.ort_fusions = ort_fusions
        self.name = "exporters-onnx" + (f"+fusions-{ort_fusions}" if ort_fusions else "")
        self.prefill = self.decode = None

    def _setup(self):
        import onnxruntime as ort
        from transformers.exporters import OnnxConfig, OnnxExporter

        # Two left-padded rows of different lengths: every axis of size > 1, so the
        # dynamic export (Dim.AUTO) keeps batch and sequence symbolic (a size-1 sample
        # axis would be specialized to 1), and the traced masking sees padding.
        ids, mask = warmup_prompt(self.model, batch=2, length=6)
        ids[1, :2], mask[1, :2] = 0, 0
        sample = {"input_ids": ids, "attention_mask": mask}
        try:
            # The exporter sets attributes on the model it is given (it swaps and
            # restores forward): a shallow copy keeps the caller's model as it was.
            exported = OnnxExporter().export_for_generation(
                copy.copy(self.model), sample, OnnxConfig(dynamic=True, ort_fusions=self.ort_fusions)
            )
        except Exception as error:
            cause = f" (caused by {error.__cause__!r})" if error.__cause__ is not None else ""
            raise NotImplementedError(
                f"transformers' OnnxExporter cannot export {type(self.model).__name__} for generation: {error!r}{cause}"
            ) from error
        if set(exported.components) != {"prefill", "decode"}:
            raise NotImplementedError(
                f"the export of {type(self.model).__name__} has components {list(exported.components)}; "
                "this peer runs decoder-only models (prefill + decode)"
            )
        for stage, component in exported.components.items():
            extra = set(component.metadata.kwargs) - _FED_INPUTS
            if extra:
                raise NotImplementedError(f"the exported {stage} graph takes {sorted(extra)}, which this loop does not feed")

        options = ort.SessionOptions()
        # ONNX Runtime sizes its pool from every core of the machine; use torch's setting
        # so both sides of the comparison run on the same number of threads.
        options.intra_op_num_threads = torch.get_num_threads()
        # Between two session runs the loop runs torch ops (argmax, mask and cache
        # bookkeeping) on torch's own threads; ONNX Runtime's workers spinning after each
        # run compete with them for the same cores. Measured on 2 cores: a 1 ms prefill
        # took ~10 ms in about half of the runs with spinning, never without.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        exported.to(self.model.device, session_options=options)
        self.prefill, self.decode = exported.runners["prefill"], exported.runners["decode"]

    def _greedy_config(self, prompt_len: int, max_new_tokens: int):
        """The GenerationConfig HF's generate would use for this call."""
        config, _, has_default_max_length = resolve_config(
            self.model.generation_config, None, {"max_new_tokens": max_new_tokens, "do_sample": False}
        )
        resolve_lengths(config, prompt_len, has_default_max_length, None)
        if config.get_generation_mode() != GenerationMode.GREEDY_SEARCH:
            raise NotImplementedError(
                f"the model's generation config asks for {config.get_generation_mode().value!r}; this peer is greedy only"
            )
        return config

    def generate(self, input_ids, attention_mask, max_new_tokens):
        if self.prefill is None:
            raise RuntimeError("call prepare() first: it exports the model and opens the ONNX Runtime sessions")
        if self.ort_fusions and not bool(attention_mask.all()):
            raise NotImplementedError(
                f"ExportersOnnx(ort_fusions={self.ort_fusions!r}) does not run left-padded batches: ONNX Runtime's "
                "fused graph decodes wrong tokens for padded rows (HF's match only the first token); "
                "use ort_fusions=None for padded batches"
            )
        batch, prompt_len = input_ids.shape
        config = self._greedy_config(prompt_len, max_new_tokens)
        eos = None if self.ignore_eos else config.eos_token_id
        eos = torch.tensor([eos] if isinstance(eos, int) else eos, device=input_ids.device) if eos is not None else None
        pad = config.pad_token_id if config.pad_token_id is not None else (int(eos[0]) if eos is not None else None)
        # The processors HF builds from the model's generation config (none for a plain
        # config; e.g. a repetition penalty for some checkpoints), so tokens stay HF's.
        processors = build_logits_processor(config, prompt_len, attention_mask, eos, None, input_ids.device)

        # generate()'s inputs: positions count the real tokens of each row (0 on padding),
        # and the padding mask grows by one column per token.
        mask = attention_mask.to(torch.long)
        position_ids = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        # An empty cache like generate() builds: some layers carry tensors even empty
        # (a sliding window's size), which the prefill graph then reads.
        cache = DynamicCache(config=self.model.config.get_text_config(decoder=True))
        sequences, unfinished, times = input_ids, torch.ones(batch, dtype=torch.bool, device=input_ids.device), []
        with torch.no_grad():
            cache_name = cache_arg(self.model)
            out = self.prefill(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, **{cache_name: cache})
            for _ in range(config.max_length - prompt_len):
                # The prefill graph returns logits for every prompt position (the export
                # drops generate's logits_to_keep): the last one is the next token's.
                scores = processors(sequences, out.logits[:, -1].to(torch.float32))
                next_tokens = scores.argmax(dim=-1)
                if eos is not None:  # a finished row keeps emitting pad, as in HF
                    next_tokens = torch.where(unfinished, next_tokens, torch.full_like(next_tokens, pad))
                    unfinished &= ~torch.isin(next_tokens, eos)
                sequences = torch.cat([sequences, next_tokens[:, None]], dim=1)
                times.append(time.perf_counter())
                if sequences.shape[1] == config.max_length or not bool(unfinished.any()):
                    break
                mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
                position_ids = position_ids[:, -1:] + 1
                # The cache is the one the previous call returned: tensors ONNX Runtime
                # allocated, bound again as this call's inputs without a copy.
                out = self.decode(
                    input_ids=next_tokens[:, None], attention_mask=mask, position_ids=position_ids,
                    **{cache_name: output_cache(out)},
                )
        return sequences, times


PEERS = {peer.name: peer for peer in (HFEager, HFStaticCompile, ExportersOnnx)}
