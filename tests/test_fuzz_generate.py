"""Property-based: generate() on random inputs and kwargs against HF's generate() on the same call.

The property, for every drawn call:

* both raise: pdcompile's error is a ValueError / TypeError (CapacityError is one) whose message
  names an argument of the call, not a raw torch error from inside the graphs;
* both return: the same tokens (sampling too, with every warper drawn here: the seed is set
  right before each call and both draw with torch.multinomial on the same processed scores),
  and the same scores / logits;
* only pdcompile raises: allowed for two reasons, both by design and checked here:
  - a request beyond its capacity (max_batch_size / max_seq_len): CapacityError;
  - an attention_mask that is not left padding of 0s and 1s (right padding, holes, an
    all-zero row, other values), passed or inferred from pad_token_id as HF does: HF runs
    those (with a warning at most); the compiled path packs left padding only, and HF reads
    a 2 as two positions, so pdcompile refuses with a ValueError naming attention_mask;
* only HF raises: never allowed.

Tiny random llama on the eager backend (nothing compiled), at most 6 new tokens when the call
sets a length: 500 examples take one to three minutes on 2 cores.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import transformers
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from transformers.generation import RepetitionPenaltyLogitsProcessor, StoppingCriteriaList

import models
import pdcompile
from conftest import optimized
from models import Ban, StopAtLength

MAX_SEQ_LEN, MAX_BATCH = 64, 4
ABSENT = object()  # the kwarg is not passed at all (None is passed: it overrides the model's default)


class Pair(tuple):
    """(HF model, OptimizedModel), with a short repr for Hypothesis' failure reports."""

    def __repr__(self):
        return f"Pair(llama, eager, max_seq_len={MAX_SEQ_LEN}, max_batch_size={MAX_BATCH})"


@pytest.fixture(scope="module")
def pair():
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # HF's per-call advice would flood the log
    yield Pair(optimized("llama", "eager", max_seq_len=MAX_SEQ_LEN, max_batch_size=MAX_BATCH))
    transformers.logging.set_verbosity(level)


def _or_absent(*values):
    return st.sampled_from([ABSENT, *values])


# Each argument has ordinary values and edge values (None, 0, negative, floats, wrong types,
# invalid masks...). A call takes ordinary values everywhere except for at most one argument,
# its "edge": with every argument free to go wrong at once, nearly every call would be refused
# by both sides and the token comparison would rarely run. Half the calls have no edge.
EDGES = ["batch", "width", "ids_dtype", "vocab", "device", "mask", "max_new_tokens", "max_length", "min_new_tokens",
         "temperature", "top_k", "top_p", "repetition_penalty", "no_repeat_ngram_size", "eos_token_id",
         "pad_token_id", "num_return_sequences", "return_dict", "stopping_criteria", "logits_processor"]


def _pick(draw, edge, name, ordinary, unusual):
    return draw(unusual if edge == name else ordinary)


@st.composite
def calls(draw):
    """A generate() call: its kwargs, the seed to set before it, and its edge argument."""
    edge = draw(st.sampled_from([None] * len(EDGES) + EDGES))
    pick = lambda name, ordinary, unusual: _pick(draw, edge, name, ordinary, unusual)  # noqa: E731

    batch = pick("batch", st.integers(1, 4), st.sampled_from([0, 5]))
    width = pick("width", st.integers(1, 40), st.just(0))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    ids = torch.randint(0, models.VOCAB, (batch, width), generator=g)
    if edge == "vocab" and batch and width:
        ids[draw(st.integers(0, batch - 1)), draw(st.integers(0, width - 1))] = draw(st.sampled_from([models.VOCAB, -1]))
    ids = ids.to(pick("ids_dtype", st.sampled_from([torch.int64, torch.int32]),
                      st.sampled_from([torch.int16, torch.float32, torch.bool])))
    kw = {"inputs" if draw(st.booleans()) else "input_ids": ids}
    # the only device here is the CPU: a tensor on "meta" stands for one on another device
    moved = draw(st.sampled_from(["input_ids", "attention_mask"])) if edge == "device" else None
    if moved == "input_ids":
        kw = {k: v.to("meta") for k, v in kw.items()}

    pattern = pick("mask", st.sampled_from(["absent", "ones", "left"]),
                   st.sampled_from(["right", "hole", "zero_row", "value"]))
    if pattern != "absent":
        mask = torch.ones(batch, width, dtype=torch.long)
        for row in range(batch if width else 0):
            if pattern == "left":
                mask[row, : draw(st.integers(0, width - 1))] = 0
            elif pattern == "right":
                mask[row, width - draw(st.integers(0, width - 1)):] = 0
        if pattern in ("hole", "zero_row", "value") and batch and width:
            row, col = draw(st.integers(0, batch - 1)), draw(st.integers(0, width - 1))
            if pattern == "hole":
                mask[row, col] = 0
            elif pattern == "zero_row":
                mask[row] = 0
            else:
                mask[row, col] = 2
        kw["attention_mask"] = mask.to(draw(st.sampled_from([torch.int64, torch.bool, torch.float32, torch.int32])))
        if moved == "attention_mask":
            kw["attention_mask"] = kw["attention_mask"].to("meta")

    # lengths short (at most 6 new tokens when set), max_length relative to the prompt
    kw["max_new_tokens"] = pick("max_new_tokens", _or_absent(1, 2, 3, 4, 5, 6),
                                st.sampled_from([None, 0, -1, 0.5, 2.5, 4.0, True]))
    kw["max_length"] = pick("max_length", st.one_of(st.just(ABSENT), st.integers(1, 6).map(lambda d: width + d)),
                            st.one_of(st.none(), st.sampled_from([-3, -1, 0, 0.5, 2.5]).map(lambda d: width + d)))
    kw["min_new_tokens"] = pick("min_new_tokens", _or_absent(0, 1, 3, 6), st.sampled_from([None, -1, 2.0]))
    kw["do_sample"] = draw(_or_absent(False, True))
    kw["temperature"] = pick("temperature", _or_absent(0.5, 1.0, 1.7), st.sampled_from([None, 0.0, -1.0]))
    kw["top_k"] = pick("top_k", _or_absent(0, 1, 5, 50), st.sampled_from([None, -1, 2.0]))
    kw["top_p"] = pick("top_p", _or_absent(0.5, 0.9, 1.0), st.sampled_from([None, 0.0, 1.5]))
    kw["repetition_penalty"] = pick("repetition_penalty", _or_absent(0.7, 1.0, 1.3), st.sampled_from([None, 0.0, -1.0]))
    kw["no_repeat_ngram_size"] = pick("no_repeat_ngram_size", _or_absent(0, 1, 2, 3), st.sampled_from([None, -1, 2.0]))
    # a long eos list makes rows finish early now and then (random weights: any token may come)
    kw["eos_token_id"] = pick("eos_token_id", st.one_of(
        st.just(ABSENT), st.integers(0, models.VOCAB - 1), st.lists(st.integers(0, models.VOCAB - 1), min_size=1, max_size=40)),
        st.sampled_from([None, [], -1]))
    kw["pad_token_id"] = pick("pad_token_id", st.one_of(st.just(ABSENT), st.integers(0, models.VOCAB - 1)),
                              st.sampled_from([None, -1]))
    kw["num_return_sequences"] = pick("num_return_sequences", _or_absent(1, 2, 3), st.sampled_from([None, 0, -1, 2.0]))
    flags = pick("return_dict", _or_absent(False, True), st.just(None))
    kw["return_dict_in_generate"] = flags
    kw["output_scores"] = draw(_or_absent(False, True)) if flags is not None else None
    kw["output_logits"] = draw(_or_absent(False, True)) if flags is not None else None

    stop = StopAtLength(width + draw(st.integers(1, 5)))
    kind = pick("stopping_criteria", st.sampled_from([ABSENT, list, tuple, StoppingCriteriaList]),
                st.sampled_from([None, "bare", "not callable"]))
    kw["stopping_criteria"] = {"bare": stop, "not callable": [stop, 3]}.get(kind, kind)
    if kind in (list, tuple, StoppingCriteriaList):
        kw["stopping_criteria"] = kind([stop])
    ban = Ban(draw(st.integers(0, models.VOCAB - 1)))
    # a user RepetitionPenaltyLogitsProcessor replaces the built-in one when repetition_penalty is set, as in HF
    kw["logits_processor"] = pick("logits_processor", _or_absent([ban], (ban,), [RepetitionPenaltyLogitsProcessor(1.5)]),
                                  st.sampled_from([None, "bare"]))
    if kw["logits_processor"] == "bare":
        kw["logits_processor"] = ban
    return {k: v for k, v in kw.items() if v is not ABSENT}, draw(st.integers(0, 1000)), edge


def _run(generate, kw, seed):
    torch.manual_seed(seed)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return generate(**kw), None
    except Exception as e:  # noqa: BLE001 - the property compares what each side raised
        return None, e


def _mask_is_left_padding(mask) -> bool:
    """Independent of pdcompile: every row zeros then at least one one, values 0/1 only."""
    if mask is None:
        return True
    for row in mask.to(torch.float64).tolist():
        if any(v not in (0.0, 1.0) for v in row) or (row and row[-1] != 1.0) or row != sorted(row):
            return False
    return True


def _hf_mask(kw, model):
    """The mask HF uses: the one passed, else one inferred from pad_token_id (tokens equal to it are
    padding) when that id is in the prompt and is not an eos id."""
    if kw.get("attention_mask") is not None:
        return kw["attention_mask"]
    ids = kw.get("input_ids", kw.get("inputs"))
    pad = kw.get("pad_token_id")
    eos = kw.get("eos_token_id", model.generation_config.eos_token_id)
    eos = [] if eos is None else torch.as_tensor(eos).reshape(-1).tolist()
    if pad is None or pad in eos or ids.dtype not in (torch.int32, torch.int64) or not bool((ids == pad).any()):
        return None
    return (ids != pad).long()


def _beyond_capacity(kw) -> bool:
    ids = kw.get("input_ids", kw.get("inputs"))
    rows = ids.shape[0] * max(1, kw.get("num_return_sequences") or 1)
    width = ids.shape[1]
    if kw.get("max_new_tokens") is not None:
        total = width + math.ceil(kw["max_new_tokens"])
    elif kw.get("max_length") is not None:
        total = math.ceil(kw["max_length"])
    else:
        total = width + 20  # HF's default: 20 new tokens
    return rows > MAX_BATCH or total > MAX_SEQ_LEN


# Words an error may use for an argument: HF's own processors name their parameter
# (RepetitionPenaltyLogitsProcessor says `penalty`), lengths are checked as max_length.
_NAMES = {
    "inputs": ("input_ids", "token id", "prompt"),
    "input_ids": ("input_ids", "token id", "prompt"),
    "attention_mask": ("attention_mask",),
    "max_new_tokens": ("max_new_tokens", "max_length"),
    "max_length": ("max_length",),
    "min_new_tokens": ("min_new_tokens", "min_length"),
    "repetition_penalty": ("repetition_penalty", "penalty"),
    "no_repeat_ngram_size": ("no_repeat_ngram_size", "ngram_size"),
    "logits_processor": ("logits_processor", "penalty"),
}


# Edges that are about the prompt itself: only there may an error blame input_ids alone
# (every call has input_ids, so "names an argument" would otherwise always hold).
_PROMPT_EDGES = {None, "batch", "width", "ids_dtype", "vocab", "device"}


def _names_an_argument(err: Exception, kw: dict, edge) -> bool:
    msg = str(err)
    names = [n for n in kw if n not in ("inputs", "input_ids") or edge in _PROMPT_EDGES]
    return any(word in msg for name in names for word in _NAMES.get(name, (name,)))


def check_call(pair, kw, seed, edge=None):
    model, fast = pair
    ref, ref_err = _run(model.generate, kw, seed)
    out, out_err = _run(fast.generate, kw, seed)
    # what the examples exercised: pytest --hypothesis-show-statistics
    event(f"HF {'raised ' + type(ref_err).__name__ if ref_err else 'ran'}, "
          f"pdcompile {'raised ' + type(out_err).__name__ if out_err else 'ran'}")

    if out_err is not None:
        assert isinstance(out_err, (ValueError, TypeError)), f"raw error from pdcompile: {out_err!r}"
        if isinstance(out_err, pdcompile.CapacityError):  # names the value and the limit instead
            assert _beyond_capacity(kw), f"CapacityError within capacity: {out_err}"
            return
        assert _names_an_argument(out_err, kw, edge), f"the error names no argument of the call: {out_err!r}"
        if ref_err is None:  # pdcompile-only refusal: by design for masks only
            assert not _mask_is_left_padding(_hf_mask(kw, model)), f"HF ran this call, pdcompile raised {out_err!r}"
            assert "attention_mask" in str(out_err)
        return
    assert ref_err is None, f"HF raised {ref_err!r} but pdcompile returned"

    if kw.get("return_dict_in_generate"):
        assert torch.equal(ref.sequences, out.sequences)
        for field in ("scores", "logits"):
            a, b = getattr(ref, field), getattr(out, field)
            assert (a is None) == (b is None), field
            if a is not None:
                assert len(a) == len(b), field
                for x, y in zip(a, b):
                    torch.testing.assert_close(y, x, atol=1e-3, rtol=1e-3)
    else:
        assert isinstance(out, torch.Tensor)
        assert out.dtype == ref.dtype
        assert torch.equal(ref, out)


_SETTINGS = dict(deadline=None, derandomize=True, database=None, print_blob=True,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@settings(max_examples=500, **_SETTINGS)
@given(call=calls())
def test_generate_matches_hf_or_both_refuse(pair, call):
    check_call(pair, *call)


@pytest.mark.slow
@settings(max_examples=3000, **_SETTINGS)
@given(call=calls())
def test_generate_matches_hf_or_both_refuse_long(pair, call):
    check_call(pair, *call)
