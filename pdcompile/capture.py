"""Capture an unmodified HF causal LM as a prefill graph and a decode graph.

Both graphs come from ``torch.export`` of the model's own ``forward`` with the KV
cache handed in as explicit tensors: a small :class:`transformers.cache_utils.Cache`
subclass wraps those tensors, so HF's attention code writes into them in place and
the exported graph shows the writes as ``index_copy_`` / ``index_put_`` on graph
inputs. The graphs take flat tensor inputs (the phase contract below) and return
one logits tensor; parameters are shared with the original model, not copied.

Phase contract (what the runtime feeds and what the passes may rely on)::

    prefill(input_ids[B, S], last_idx[B], k_0, v_0, ..., k_{L-1}, v_{L-1}) -> logits[B, V]
        Prompts are RIGHT-padded: row b holds its tokens at positions 0..last_idx[b];
        positions past last_idx[b] are padding whose outputs and cache slots are
        undefined (never read: decode overwrites slot last_idx[b] + 1 first).
        Writes k/v of positions 0..S-1 into cache slots 0..S-1. Returns the logits of
        position last_idx[b] of each row.

    decode(input_ids[B, 1], pos[B], k_0, v_0, ...) -> logits[B, V]
        Token b sits at position pos[b]; its k/v are written to slot pos[b] of row b
        and it attends to slots 0..pos[b] of its row.

    k_i, v_i: [B, kv_heads_i, T, head_dim_i], T the cache capacity of the call.

B, S and T are dynamic dimensions. Right padding is what lets the prefill attention
be purely causal for every real token (the runtime turns HF's left-padded batches
into this layout), and per-row positions are what a paged cache needs later.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import io
import logging
import re
import sys
import time
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .hf_compat import cache_arg
from .phase import PhaseSignature, RepeatedLayers

logger = logging.getLogger(__name__)


class UnsupportedModelError(ValueError):
    """The model cannot be captured.

    The message names the model class, the capture phase that failed ("check": config and
    forward signature; "probe": one eager forward on two tokens; "prefill", "decode",
    "extend", "score": torch.export of that phase), the construct that failed and what to
    do instead; the same parts are attributes. The underlying error, if any, is chained
    (``__cause__``).
    """

    def __init__(self, message: str, *, model_class: str | None = None, phase: str | None = None,
                 construct: str | None = None, remedy: str | None = None):
        super().__init__(message)
        self.model_class, self.phase, self.construct, self.remedy = model_class, phase, construct, remedy

    @classmethod
    def of(cls, model, phase: str, construct: str, remedy: str) -> "UnsupportedModelError":
        name = type(model).__name__
        return cls(f"{name} cannot be captured (phase: {phase}): {construct}. What to do: {remedy}",
                   model_class=name, phase=phase, construct=construct, remedy=remedy)


# What to tell the user for every model pdcompile cannot run (one place, so all refusals agree).
_USE_HF = "run it with transformers' own generate() (pdcompile does not speed it up)"
_DECODER_ONLY = ("pdcompile captures decoder-only transformers whose every layer is attention over a "
                 "key/value cache (Llama, Mistral, Qwen, Gemma, Phi, GPT-2 families and the like); " + _USE_HF)


@dataclass(frozen=True)
class LayerGeometry:
    kv_heads: int
    head_dim: int
    v_head_dim: int
    window: int = 0  # sliding-window layer: attends to the last ``window`` positions (0: all)


@dataclass(frozen=True)
class CacheGeometry:
    """Shape of the KV cache the graphs expect: one (k, v) pair per attention layer."""

    layers: tuple[LayerGeometry, ...]
    dtype: torch.dtype

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def kv_shapes(self) -> list[tuple[int, int]]:
        """(kv_heads, head_dim) of every cache tensor, in graph order: k_0, v_0, k_1, v_1, ..."""
        return [(g.kv_heads, d) for g in self.layers for d in (g.head_dim, g.v_head_dim)]

    def within(self, max_seq_len: int) -> "CacheGeometry":
        """The geometry for sequences of at most ``max_seq_len`` tokens: a window that long sees
        every position, so such a layer is a full-attention layer there."""
        return dataclasses.replace(self, layers=tuple(
            dataclasses.replace(g, window=0) if g.window >= max_seq_len else g for g in self.layers))

    def kv_windows(self) -> list[int]:
        """The sliding window of every cache tensor's layer (0: full attention), in graph order."""
        return [g.window for g in self.layers for _ in range(2)]

    def bytes_per_token(self) -> int:
        item = torch.empty((), dtype=self.dtype).element_size()
        return sum(g.kv_heads * (g.head_dim + g.v_head_dim) for g in self.layers) * item

    def allocate(self, batch: int, capacity: int, device) -> list[torch.Tensor]:
        # Zeros, not empty: masked-out slots still enter the attention matmul with weight 0,
        # and 0 * NaN from uninitialised memory would poison the output.
        out = []
        for g in self.layers:
            out.append(torch.zeros(batch, g.kv_heads, capacity, g.head_dim, dtype=self.dtype, device=device))
            out.append(torch.zeros(batch, g.kv_heads, capacity, g.v_head_dim, dtype=self.dtype, device=device))
        return out


# --------------------------------------------------------------------------- cache shim


class _CaptureLayer(CacheLayerMixin):
    """One layer's cache, backed by graph-input tensors, following the phase contract."""

    is_compileable = True
    is_sliding = False

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, pos: torch.Tensor | None, extend: bool = False):
        super().__init__()
        self.keys, self.values = keys, values
        self.pos = pos  # None in prefill; [B] position of the (first) new token in decode/extend
        self.extend = extend
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:  # tensors are given
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        if self.pos is None:
            # Prefill from position 0: store all S positions, attend over the prompt only.
            idx = torch.arange(key_states.shape[2], device=key_states.device)
            self.keys.index_copy_(2, idx, key_states)
            self.values.index_copy_(2, idx, value_states)
            return key_states, value_states
        rows = torch.arange(key_states.shape[0], device=key_states.device)
        if self.extend:
            # S new tokens of row b go to slots pos[b] .. pos[b] + S - 1
            slots = self.pos.unsqueeze(1) + torch.arange(key_states.shape[2], device=key_states.device)
            self.keys[rows.unsqueeze(1), :, slots] = key_states.transpose(1, 2)
            self.values[rows.unsqueeze(1), :, slots] = value_states.transpose(1, 2)
            return self.keys, self.values
        self.keys[rows, :, self.pos] = key_states[:, :, 0]
        self.values[rows, :, self.pos] = value_states[:, :, 0]
        return self.keys, self.values

    def get_mask_sizes(self, query_length, *args, **kwargs):
        if self.pos is None:
            return query_length, 0
        return self.keys.shape[2], 0

    def get_seq_length(self, *args, **kwargs):
        # Decode: claim the last slot so HF's causal term (kv_idx <= q_idx) admits every
        # slot; the per-row limit comes from the 2-D attention mask built from `pos`.
        return 0 if self.pos is None else self.keys.shape[2] - 1

    def get_max_length(self):
        return self.keys.shape[2]


class _CaptureCache(Cache):
    def __init__(self, layers):
        super().__init__(layers=layers)

    def get_query_offset(self, layer_idx: int = 0):
        return self.layers[0].get_seq_length()


class _ProbeLayer(CacheLayerMixin):
    """Records the k/v geometry HF hands to the cache; behaves like a fresh dynamic cache."""

    is_compileable = False
    is_sliding = False

    def __init__(self):
        super().__init__()
        self.shapes = None

    def lazy_initialization(self, key_states, value_states) -> None:
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        self.shapes = (tuple(key_states.shape), tuple(value_states.shape), key_states.dtype)
        return key_states, value_states

    def get_mask_sizes(self, query_length, *args, **kwargs):
        return query_length, 0

    def get_seq_length(self, *args, **kwargs):
        return 0

    def get_max_length(self):
        return -1


class _ProbeCache(Cache):
    def __init__(self):
        super().__init__(layer_class_to_replicate=_ProbeLayer)

    def get_query_offset(self, layer_idx: int = 0):
        return 0


# --------------------------------------------------------------------------- wrappers


@dataclass(frozen=True)
class SlidingLayout:
    """Which layers attend to a sliding window, read from the config (not from a family list).

    ``layer_types``: the config's per-layer types when it has them (hybrid models such as
    Gemma2/3, Qwen2 with max_window_layers); ``None`` when every layer slides (Mistral-style
    ``sliding_window`` without ``layer_types``).
    """

    window: int
    layer_types: tuple[str, ...] | None


_LAYER_TYPES = {"full_attention", "sliding_attention"}


def sliding_layout(config) -> SlidingLayout | None:
    """The model's sliding-window layout, or ``None`` when no layer slides."""
    config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        unknown = sorted(set(layer_types) - _LAYER_TYPES)
        if unknown:
            raise UnsupportedModelError(
                f"{type(config).__name__} has layer types {unknown}; pdcompile captures full and sliding-window "
                "attention layers only (recurrent, linear or chunked attention layers are not supported)."
            )
        if "sliding_attention" not in layer_types:
            return None
        if not isinstance(window, int) or window < 1:
            raise UnsupportedModelError(f"{type(config).__name__} has sliding layers but sliding_window={window!r}")
        return SlidingLayout(window, tuple(layer_types))
    if isinstance(window, int) and window > 0 and getattr(config, "use_sliding_window", True) is not False:
        return SlidingLayout(window, None)
    return None


def _layer_window(layout: SlidingLayout | None, layer: int) -> int:
    if layout is None:
        return 0
    if layout.layer_types is None or layout.layer_types[layer] == "sliding_attention":
        return layout.window
    return 0


class _PhaseModule(torch.nn.Module):
    """What every phase wrapper shares: the model called on cache tensors it writes in place."""

    def __init__(self, model: torch.nn.Module, num_layers: int):
        super().__init__()
        self.model = model
        self.num_layers = num_layers
        self.cache_arg = cache_arg(model)
        self.sliding = sliding_layout(model.config)

    def _mask(self, q_pos, capacity: int, keys=None):
        """The 4-D keep-mask ``[B, 1, S, T]``: query at position ``q_pos[b, i]`` sees keys 0..q_pos,
        and on sliding layers only the last ``window`` of them (HF's ``q - k < window``).

        Handed to HF ready-made (a dict by layer type for hybrid models), because HF's own
        masks assume one query offset for the whole batch, and its sliding masks count from
        the cache length the capture claims, not from each row's position.
        """
        batch, seq = q_pos.shape
        kv = torch.arange(capacity, device=q_pos.device).view(1, 1, 1, -1)
        q = q_pos.view(batch, 1, seq, 1)
        full = kv <= q
        if keys is not None:
            full = full & keys.view(batch, 1, 1, -1)
        masks = {"full_attention": full}
        if self.sliding is not None:
            masks["sliding_attention"] = full & (q - kv < self.sliding.window)
        if getattr(self.model.config, "_attn_implementation", "sdpa") != "sdpa":
            # HF's eager attention adds a ready-made mask to the scores: additive, not bool
            dtype = next(self.model.parameters()).dtype
            masks = {k: torch.zeros((), dtype=dtype, device=m.device).masked_fill(~m, torch.finfo(dtype).min)
                     for k, m in masks.items()}
        if self.sliding is None:
            return masks["full_attention"]
        if self.sliding.layer_types is None:
            return masks["sliding_attention"]
        return masks

    def _logits(self, input_ids, attention_mask, position_ids, caches, cache_pos, extend: bool = False):
        layers = [_CaptureLayer(caches[2 * i], caches[2 * i + 1], cache_pos, extend=extend) for i in range(self.num_layers)]
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            **{self.cache_arg: _CaptureCache(layers)},
        )
        return out.logits


class PrefillModule(_PhaseModule):
    """The prefill phase of the contract, as a module torch.export can trace."""

    def _all_logits(self, input_ids, last_idx, caches):
        batch, seq = input_ids.shape
        positions = torch.arange(seq, device=input_ids.device).unsqueeze(0).expand(batch, seq)
        # HF builds its causal+padding mask from this; the mask-fusion pass replaces it.
        attention_mask = positions <= last_idx.unsqueeze(1)
        if self.sliding is not None:
            attention_mask = self._mask(positions, seq, keys=attention_mask)
        return self._logits(input_ids, attention_mask, positions, caches, None)

    def forward(self, input_ids, last_idx, *caches):
        logits = self._all_logits(input_ids, last_idx, caches)
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        return logits[rows, last_idx]


class ScoreModule(PrefillModule):
    """Prefill that returns the logits of every position, [B, S, V] (for forward())."""

    def forward(self, input_ids, last_idx, *caches):
        return self._all_logits(input_ids, last_idx, caches)


class ExtendModule(_PhaseModule):
    """Extend: S new tokens per row after a cache that already holds positions 0..start[b]-1.

    ``extend(input_ids[B, S], start[B], last_idx[B], *caches) -> logits[B, V]``: token i
    of row b is at position start[b] + i, is written to that slot, and attends to slots
    0..start[b] + i of its row. Serves prefix-cache continuation (and chunked prefill);
    rows with fewer new tokens are right-padded, their padding never read.
    The mask is handed to HF ready-made (4-D), because HF's own masks assume one query
    offset for the whole batch.
    """

    def forward(self, input_ids, start, last_idx, *caches):
        batch, seq = input_ids.shape
        capacity = caches[0].shape[2]
        positions = start.unsqueeze(1) + torch.arange(seq, device=input_ids.device).unsqueeze(0)
        logits = self._logits(input_ids, self._mask(positions, capacity), positions, caches, start, extend=True)
        rows = torch.arange(batch, device=input_ids.device)
        return logits[rows, last_idx]


class DecodeModule(_PhaseModule):
    """The decode phase of the contract, as a module torch.export can trace."""

    def forward(self, input_ids, pos, *caches):
        capacity = caches[0].shape[2]
        if self.sliding is None:
            attention_mask = torch.arange(capacity, device=pos.device).unsqueeze(0) <= pos.unsqueeze(1)
        else:
            attention_mask = self._mask(pos.unsqueeze(1), capacity)
        return self._logits(input_ids, attention_mask, pos.unsqueeze(1), caches, pos)[:, -1]


# --------------------------------------------------------------------------- capture


@dataclass
class CapturedModel:
    """The phase graphs (flat inputs, params as attributes), their signatures, the cache they expect."""

    graphs: dict[str, tuple[torch.fx.GraphModule, PhaseSignature]]
    geometry: CacheGeometry  # the whole model's
    timings: dict[str, float]
    layers: RepeatedLayers | None = None  # the graphs hold only these layers (see repeated_layers)


# Layer kinds (config.layer_types, 5.x) whose state is keys and values in a cache.
ATTENTION_LAYER_TYPES = frozenset({"full_attention", "sliding_attention", "chunked_attention"})
# Module class names of layers that keep another kind of state (named in the refusal).
_STATEFUL_MODULE_HINTS = ("Mixer", "GatedDeltaNet", "LinearAttention", "LightningAttention", "ShortConv", "Rglru",
                          "RecurrentBlock")


def _layer_kinds(config) -> tuple[str, list[str]]:
    """(config attribute, kind of each layer); 5.x configs have layer_types, older hybrids others."""
    for attr in ("layer_types", "layers_block_type", "block_types"):
        kinds = getattr(config, attr, None)
        if isinstance(kinds, (list, tuple)) and kinds:
            return attr, [str(k) for k in kinds]
    return "", []


def check_supported(model: torch.nn.Module) -> None:
    """Refuse, before any tracing, the models whose config or forward already says they cannot work."""
    config = getattr(model, "config", None)
    if config is None:
        raise UnsupportedModelError.of(
            model, "check", "it has no `.config`", "pass a transformers PreTrainedModel (AutoModelForCausalLM)")
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError.of(
            model, "check", "it is an encoder-decoder model (is_encoder_decoder=True in its config): the "
            "decoder cross-attends to an encoder output, which the prefill/decode graphs do not carry",
            _DECODER_ONLY)
    attr, kinds = _layer_kinds(config)
    other = sorted({k for k in kinds if k not in ATTENTION_LAYER_TYPES})
    if other:
        modules = sorted({type(m).__name__ for m in model.modules()
                          if any(h in type(m).__name__ for h in _STATEFUL_MODULE_HINTS)})
        where = ", ".join([f"config.{attr}", *modules])
        raise UnsupportedModelError.of(
            model, "check", f"it has layers of kind {other} ({where}): state-space, recurrent, convolutional or "
            "linear-attention layers keep a running state, not a key/value cache", _DECODER_ONLY)
    shared = getattr(config, "num_kv_shared_layers", 0)
    if isinstance(shared, int) and shared > 0:
        raise UnsupportedModelError.of(
            model, "check", f"its last {shared} layer(s) reuse the key/value cache of earlier layers "
            "(cross-layer KV sharing, num_kv_shared_layers)", _DECODER_ONLY)
    params = inspect.signature(model.forward).parameters
    missing = [p for p in ("input_ids", "attention_mask", "position_ids") if p not in params]
    if cache_arg(model) is None:
        missing.append("cache (or past_key_values)")
    if missing:
        raise UnsupportedModelError.of(
            model, "check", f"its forward does not accept {missing}",
            "pdcompile needs a causal LM whose forward takes input_ids, attention_mask, position_ids and a KV "
            "cache (`cache=`, or `past_key_values=` before transformers 5.24); models that derive positions "
            "from the mask alone (ALiBi models such as BLOOM) or keep a recurrent state do not; " + _USE_HF)


@torch.no_grad()
def probe_geometry(model: torch.nn.Module) -> CacheGeometry:
    """Run the model once on two tokens and record what it stores in the cache."""
    device = next(model.parameters()).device
    ids = torch.tensor([[1, 2]], device=device)
    cache = _ProbeCache()
    try:
        model(input_ids=ids, use_cache=True, **{cache_arg(model): cache})
    except Exception as e:  # whatever breaks here, the model does not run on a plain KV cache
        raise UnsupportedModelError.of(
            model, "probe", f"its forward fails on a standard key/value cache ({type(e).__name__}: "
            f"{_first_line(e)})", _DECODER_ONLY) from e
    layers = []
    dtype = None
    sliding = sliding_layout(model.config)
    for i, layer in enumerate(cache.layers):
        if not isinstance(layer, _ProbeLayer) or layer.shapes is None:
            raise UnsupportedModelError.of(
                model, "probe", f"layer {i} did not store keys/values through Cache.update (a non-attention "
                "layer: recurrent, linear attention, ...)", _DECODER_ONLY)
        kshape, vshape, dtype = layer.shapes
        layers.append(LayerGeometry(kv_heads=kshape[1], head_dim=kshape[3], v_head_dim=vshape[3],
                                    window=_layer_window(sliding, i)))
    if not layers:
        raise UnsupportedModelError.of(model, "probe", "it never wrote to the key/value cache", _DECODER_ONLY)
    expected = getattr(model.config, "num_hidden_layers", len(layers))
    if len(layers) != expected:
        raise UnsupportedModelError.of(
            model, "probe", f"it wrote {len(layers)} cache layers but has {expected} hidden layers "
            "(cross-layer KV sharing)", _DECODER_ONLY)
    return CacheGeometry(layers=tuple(layers), dtype=dtype)


# --------------------------------------------------------------------------- export errors

# What each dynamic dimension of the export is, for the user, and the option that bounds it.
_DIMS = {
    "batch": ("the batch size", "max_batch_size"),
    "seq": ("the prompt length (dim 1 of input_ids)", "max_seq_len"),
    "capacity": ("the KV-cache length", "max_seq_len"),
}


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _chain(e: BaseException):
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def _user_frame(text: str) -> str:
    """' at file:line in fn: `code`' from torch's "The following call raised this error" block."""
    m = re.search(r'The following call raised this error:\s*File "([^"]+)", line (\d+), in (\S+)(?:\n[ \t]+(\S.*))?', text)
    if not m:
        return ""
    path, line, fn, code = m.groups()
    where = f" at {path.rsplit('/', 1)[-1]}:{line} in {fn}"
    return where + (f": `{code.strip()}`" if code else "")


def explain_export_error(model, phase: str, error: BaseException) -> UnsupportedModelError:
    """Translate a torch.export failure into one sentence about the model and what to do."""
    texts = [str(x) for x in _chain(error)]
    names = [type(x).__name__ for x in _chain(error)]
    text = "\n".join(texts)
    if "GuardOnDataDependentSymNode" in names or "data-dependent" in text:
        return UnsupportedModelError.of(
            model, phase, "data-dependent control flow: the forward branches on (or converts to Python) the "
            f"value of a tensor{_user_frame(text)}",
            "make that code independent of tensor values (torch.where, torch.cond, or a value fixed when the "
            "model is built), or " + _USE_HF)
    violated = re.search(r"Constraints violated \(([^)]*)\)", text)
    if violated:
        dims = [d.strip() for d in violated.group(1).split(",") if d.strip()]
        what = ", ".join(f"{_DIMS.get(d, (d, None))[0]} ('{d}')" for d in dims)
        guard = re.search(r"satisfy the generated guard (.+)", text)
        # torch writes sizes as L['input_ids'].size()[1]; say input_ids.shape[1]
        guard = guard and re.sub(r"L\['(\w+)'\]\.size\(\)\[(\d+)\]", r"\1.shape[\2]", guard.group(1).strip())
        construct = (f"the model's code only works for some values of {what}, not the whole dynamic range "
                     "pdcompile captures" + (f" (it requires {guard})" if guard else ""))
        fixes = []
        for d in dims:
            bound = re.search(rf"{re.escape(d)} = Dim\('{re.escape(d)}'[^)]*max=(\d+)", text)
            option = _DIMS.get(d, (None, None))[1]
            if bound and option:
                fixes.append(f"{option}={bound.group(1)}")
        if fixes:
            remedy = (f"pass {', '.join(fixes)} to pdcompile.optimize (the largest value the model traces for), "
                      "or remove the size-dependent branch from the model")
        else:
            remedy = ("the model specialises that dimension (a size-dependent branch or reshape); make it work for "
                      "any size, or " + _USE_HF)
        return UnsupportedModelError.of(model, phase, construct, remedy)
    if any(n in ("UnsupportedOperatorException", "DynamicOutputShapeException") for n in names) or re.search(
            r"fake impl|fake kernel|Meta kernel|not implemented for 'Meta'|data pointer", text):
        return UnsupportedModelError.of(
            model, phase, f"an operation torch.export cannot trace ({_first_line(error)})",
            "for a custom operator register a fake implementation (torch.library.register_fake); otherwise "
            "replace it with standard torch operations, or " + _USE_HF)
    return UnsupportedModelError.of(
        model, phase, f"torch.export failed ({type(error).__name__}: {_first_line(error)})",
        "the chained exception (__cause__) has torch's full report; if this is a standard decoder-only "
        "transformer, report it to pdcompile with that report; meanwhile " + _USE_HF)


class _torch_export_output:
    """Hold back what torch.export writes to stderr while it runs.

    On a failure torch prints the partial FX graph to stderr before raising; the user gets
    the translated error instead (the graph goes to the debug log). On success anything
    written (warnings) is passed on unchanged.
    """

    def __enter__(self):
        self.buffer = io.StringIO()
        self.redirect = contextlib.redirect_stderr(self.buffer)
        self.redirect.__enter__()

    def __exit__(self, exc_type, *exc):
        self.redirect.__exit__(exc_type, *exc)
        text = self.buffer.getvalue()
        if not text:
            return
        if exc_type is None:
            sys.stderr.write(text)
        else:
            logger.debug("torch.export output before the failure:\n%s", text)


def _flat_graph_module(ep: torch.export.ExportedProgram) -> torch.fx.GraphModule:
    """`ep.module()` with plain positional placeholders and no pytree / guard wrappers."""
    gm = ep.module()
    graph = gm.graph
    for node in list(graph.nodes):
        # Export's input guards and dtype/device assertions: the runtime validates inputs,
        # and these nodes would otherwise count as users that block rewrites.
        if node.op == "call_module" and node.target == "_guards_fn":
            graph.erase_node(node)
        elif node.op == "call_function" and node.target is torch.ops.aten._assert_tensor_metadata.default:
            graph.erase_node(node)
        elif node.op == "call_function" and node.target is torch.ops.aten.dropout.default and node.args[2] is False:
            node.replace_all_uses_with(node.args[0])  # eval-mode dropout is the identity
            graph.erase_node(node)
    if hasattr(gm, "_guards_fn"):
        delattr(gm, "_guards_fn")
    graph._codegen = torch.fx.graph.CodeGen()
    out = graph.output_node()
    if isinstance(out.args[0], (tuple, list)) and len(out.args[0]) == 1:
        out.args = (out.args[0][0],)
    graph.eliminate_dead_code()
    # A plain GraphModule: ep.module() carries hooks (lambdas) that make inductor's
    # FX-graph cache unable to pickle the graph, which disables warm compiles.
    return torch.fx.GraphModule(gm, graph)


class _attn_implementation:
    """Temporarily switch the model to SDPA attention (what the passes match), then restore."""

    def __init__(self, model, impl: str):
        self.model, self.impl = model, impl

    def __enter__(self):
        self.prev = getattr(self.model.config, "_attn_implementation", None)
        if self.prev != self.impl:
            try:
                self.model.set_attn_implementation(self.impl)
            except (ValueError, ImportError, AttributeError) as e:
                logger.warning(
                    "%s does not support %s attention (%s); capturing its %s attention. "
                    "Attention passes will not match it.",
                    type(self.model).__name__, self.impl, e, self.prev,
                )
        return self

    def __exit__(self, *exc):
        if self.prev is not None and getattr(self.model.config, "_attn_implementation", None) != self.prev:
            self.model.set_attn_implementation(self.prev)


_MODULES = {"prefill": PrefillModule, "decode": DecodeModule, "extend": ExtendModule, "score": ScoreModule}


def _export_phase(model, phase: str, geometry: CacheGeometry, max_batch_size: int, max_seq_len: int):
    """(graph, signature) of one phase; the signature's dims are the export's dynamic dims."""
    device = next(model.parameters()).device
    signature = PhaseSignature.contiguous(phase, geometry)
    # Example sizes: distinct values > 1 (a size-1 example would be specialised) inside the
    # declared ranges, so that no dynamic dim is mistaken for another.
    b = 3  # whatever max_batch_size is (the range covers it): see phase.export_dims
    t = min(23, max(max_seq_len, 3))
    s = min(5, t - 1)
    caches = geometry.allocate(b, t, device)
    ids = torch.ones(b, s if signature.inputs[0].shape[1] == "seq" else 1, dtype=torch.long, device=device)
    last_idx = (s - 1 - torch.arange(b, device=device)).clamp(min=0)
    rows = {
        "prefill": (last_idx,),
        "score": (last_idx,),
        "decode": (torch.arange(b, device=device) + 1,),
        "extend": (torch.arange(b, device=device) + 2, last_idx),  # start + s stays inside the example capacity
    }[phase]
    module = _MODULES[phase](model, geometry.num_layers)
    dims = signature.export_dims(max_batch_size, max_seq_len)
    plain = 1 + len(rows)
    dims = (*dims[:plain], dims[plain:])  # the modules take the caches as *caches: one tuple
    t0 = time.perf_counter()
    try:
        with torch.no_grad(), _torch_export_output():
            ep = torch.export.export(module, (ids, *rows, *caches), dynamic_shapes=dims, strict=False)
    except Exception as e:  # torch's trace is chained; the user reads what failed and what to do
        raise explain_export_error(model, phase, e) from e
    gm = _flat_graph_module(ep)
    logger.info("captured %s graph: %d nodes in %.1f s", phase, len(gm.graph.nodes), time.perf_counter() - t0)
    return gm, signature


class _capture_mode:
    """eval() + SDPA attention for the duration of a capture; the model is left as it was."""

    def __init__(self, model, attn_implementation: str = "sdpa"):
        self.model = model
        self.attn = _attn_implementation(model, attn_implementation)

    def __enter__(self):
        check_supported(self.model)
        self.was_training = self.model.training
        self.model.eval()
        self.attn.__enter__()

    def __exit__(self, *exc):
        self.attn.__exit__(*exc)
        self.model.train(self.was_training)


# --------------------------------------------------------------------------- a few layers

# Layers a repeated-layer capture keeps: the first, two from the middle, the last. The first
# and last differ from the rest once lowered (no residual before the first, the last pruned
# to the last position and followed by the final norm and head); layer 2 is the one a
# backend repeats, and layer 1 shows what layer 2 takes from the layer before it.
REPEAT_MIN_LAYERS = 5


def decoder_layers(model) -> tuple[str, torch.nn.ModuleList] | None:
    """(path, ModuleList) of the model's decoder layers: the one ModuleList as long as
    config.num_hidden_layers; None where there is none or more than one."""
    n = getattr(model.config, "num_hidden_layers", None)
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and n and len(m) == n]
    return found[0] if len(found) == 1 else None


def repeated_layers(model, geometry: CacheGeometry) -> tuple[RepeatedLayers | None, str]:
    """A plan to capture four decoder layers instead of all of them, or (None, why not).

    It needs layers of one structure: one class, the same cache shape and window, one
    config.layer_types kind. The backend checks the lowered layers against each other too
    (backends/ort_layers.py) and the model is captured whole where they differ."""
    found = decoder_layers(model)
    n = geometry.num_layers
    if found is None:
        return None, "no single list of decoder layers"
    path, layers = found
    if n < REPEAT_MIN_LAYERS:
        return None, f"{n} layers (repeating needs {REPEAT_MIN_LAYERS})"
    if len({type(layer) for layer in layers}) != 1:
        return None, "decoder layers of different classes"
    if len(set(geometry.layers)) != 1:
        return None, "layers with different cache shapes or windows"
    types = getattr(model.config, "layer_types", None)
    if types is not None and len(set(types)) != 1:
        return None, f"layers of different kinds ({sorted(set(types))})"
    if len(geometry.kv_shapes()) != 2 * n:
        return None, "not one key and one value cache per layer"
    try:
        same = _middle_layers_repeat(model, path, layers)
    except Exception as e:  # noqa: BLE001 - the check is an optimisation's; the model is captured whole
        return None, f"the check that its middle layers repeat failed ({type(e).__name__}: {_first_line(e)})"
    if not same:
        return None, "its middle layers compute differently from one another (per-layer code or constants)"
    params = dict(model.named_parameters(remove_duplicate=False))
    params.update(model.named_buffers(remove_duplicate=False))
    return RepeatedLayers(num_layers=n, kept=(0, 1, 2, n - 1), path=path, params=params), ""


def _tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    """The module's parameters and buffers, in registration order."""
    return [t for _, t in module.named_parameters(remove_duplicate=False)] + \
        [t for _, t in module.named_buffers(remove_duplicate=False)]


@contextlib.contextmanager
def _layer_list(model, path: str, modules: list[torch.nn.Module]):
    """The model with ``modules`` as its decoder layers (the ModuleList at ``path``), then its own again."""
    parent_name, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_name)
    own = getattr(parent, attr)
    setattr(parent, attr, torch.nn.ModuleList(modules))
    try:
        yield
    finally:
        setattr(parent, attr, own)


@torch.no_grad()
def _middle_layers_repeat(model, path: str, layers: torch.nn.ModuleList) -> bool:
    """Whether each of layers 3..N-2 computes what layer 2's module computes with its weights.

    The model runs twice on eight tokens: as it is, and with each of those layers replaced by
    a copy of layer 2's module holding that layer's own parameters and buffers (no copy of
    the tensors). The logits are equal exactly when nothing else differs from layer to layer:
    per-layer constants, code that branches on the layer's index (GPT-2's
    scale_attn_by_inverse_layer_idx, layers without rotary), tensors kept outside parameters.
    Checked in eager PyTorch, so it holds whatever backend lowers the graph."""
    import copy

    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = (torch.arange(8, device=device).unsqueeze(0) * 7 + 1) % vocab
    reference = model(input_ids=ids, use_cache=False).logits
    template = layers[2]
    mine = _tensors(template)
    copies = []
    for j in range(3, len(layers) - 1):
        theirs = _tensors(layers[j])
        if len(theirs) != len(mine):
            return False
        copies.append(copy.deepcopy(template, {id(t): o for t, o in zip(mine, theirs)}))
    with _layer_list(model, path, [*layers[:3], *copies, layers[-1]]):
        repeated = model(input_ids=ids, use_cache=False).logits
    return bool(torch.equal(reference, repeated))


@contextlib.contextmanager
def _only_layers(model, path: str, kept: tuple[int, ...]):
    """The model with only the decoder layers ``kept`` (the same modules, renumbered), then
    as it was: the ModuleList, config.num_hidden_layers / layer_types and each module's
    ``layer_idx`` (the cache slot HF attention writes) are put back whatever happens."""
    full = model.get_submodule(path)
    config = model.config
    saved_config = {k: getattr(config, k) for k in ("num_hidden_layers", "layer_types") if hasattr(config, k)}
    indexed = [(new, m) for new, i in enumerate(kept) for m in full[i].modules()
               if isinstance(getattr(m, "layer_idx", None), int)]
    saved_idx = [(m, m.layer_idx) for _, m in indexed]
    try:
        with _layer_list(model, path, [full[i] for i in kept]):
            for new, m in indexed:
                m.layer_idx = new
            config.num_hidden_layers = len(kept)
            if saved_config.get("layer_types") is not None:
                config.layer_types = [saved_config["layer_types"][i] for i in kept]
            yield
    finally:
        for k, v in saved_config.items():
            setattr(config, k, v)
        for m, idx in saved_idx:
            m.layer_idx = idx


def capture(
    model: torch.nn.Module, max_batch_size: int, max_seq_len: int, attn_implementation: str = "sdpa",
    phases: tuple[str, ...] = ("prefill", "decode"), repeat_layers: bool = False,
) -> CapturedModel:
    """Export the ``phases`` graphs of ``model`` (prefill and decode; see the module docstring).

    ``attn_implementation`` is the HF attention the graphs are captured with; the passes
    match SDPA ("sdpa"), anything else is captured as is and left alone.
    ``repeat_layers``: capture four decoder layers where :func:`repeated_layers` allows it
    (the result's ``layers`` says so), for a backend that repeats one; otherwise all.
    """
    timings: dict[str, float] = {}
    with _capture_mode(model, attn_implementation):
        t0 = time.perf_counter()
        geometry = probe_geometry(model).within(max_seq_len)
        timings["probe"] = time.perf_counter() - t0
        plan = None
        if repeat_layers:
            plan, why = repeated_layers(model, geometry)
            if plan is None:
                logger.info("capturing every layer: %s", why)
        if plan is not None:
            try:
                with _only_layers(model, plan.path, plan.kept):
                    small = probe_geometry(model).within(max_seq_len)
                    graphs = {}
                    for phase in phases:
                        t0 = time.perf_counter()
                        graphs[phase] = _export_phase(model, phase, small, max_batch_size, max_seq_len)
                        timings[f"export_{phase}"] = time.perf_counter() - t0
                logger.info("captured decoder layers %s of %d (the backend repeats layer %d)",
                            list(plan.kept), plan.num_layers, plan.kept[2])
                return CapturedModel(graphs=graphs, geometry=geometry, timings=timings, layers=plan)
            except (UnsupportedModelError, RuntimeError, IndexError, KeyError, ValueError) as e:
                # a model whose code counts its layers some other way: captured whole (below)
                logger.info("capturing every layer: with four of %d the model did not trace (%s)",
                            plan.num_layers, _first_line(e))
        graphs = {}
        for phase in phases:
            t0 = time.perf_counter()
            graphs[phase] = _export_phase(model, phase, geometry, max_batch_size, max_seq_len)
            timings[f"export_{phase}"] = time.perf_counter() - t0
    return CapturedModel(graphs=graphs, geometry=geometry, timings=timings)


def capture_phase(
    model: torch.nn.Module, phase: str, max_batch_size: int, max_seq_len: int, geometry: CacheGeometry
) -> tuple[torch.fx.GraphModule, PhaseSignature]:
    """One more phase graph on demand: "score" (prefill returning every position's logits)
    or "extend" (new tokens after a cached prefix)."""
    with _capture_mode(model):
        return _export_phase(model, phase, geometry, max_batch_size, max_seq_len)
