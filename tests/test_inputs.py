"""Inputs HF's generate() accepts work here too, and what it refuses is refused the same way.

Every case runs HF's own generate() on the same call and compares.
"""

import dataclasses
import inspect

import pytest
import torch
from transformers.generation import RepetitionPenaltyLogitsProcessor

import models
from models import Ban, StopAtLength
import pdcompile
from conftest import optimized
from pdcompile.kv_pool import BlockPool, KVPoolExhausted


@pytest.fixture(scope="module")
def pair():
    return optimized("llama", "eager")


def _prompt(batch=2, length=6, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, models.VOCAB, (batch, length), generator=g)


def _raises(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the test compares what each side raised
        return e
    return None


# ------------------------------------------------------------------ user lists

@pytest.mark.parametrize("container", [list, tuple])
def test_plain_list_of_stopping_criteria_and_logits_processors(pair, container):
    model, fast = pair
    ids = _prompt()
    greedy = model.generate(input_ids=ids, max_new_tokens=8, do_sample=False)
    banned = int(greedy[0, ids.shape[1]])  # the first token greedy would pick: banning it changes the output
    kw = dict(input_ids=ids, max_new_tokens=8, do_sample=False,
              stopping_criteria=container([StopAtLength(ids.shape[1] + 4)]),
              logits_processor=container([Ban(banned)]))
    ref, out = model.generate(**kw), fast.generate(**kw)
    assert out.shape[1] == ids.shape[1] + 4
    assert banned not in out[:, ids.shape[1]:].tolist()[0]
    assert torch.equal(ref, out)


def test_a_single_criteria_not_in_a_list_is_refused_like_hf(pair):
    model, fast = pair
    kw = dict(input_ids=_prompt(), max_new_tokens=3, stopping_criteria=StopAtLength(8))
    assert isinstance(_raises(lambda: model.generate(**kw)), TypeError)
    with pytest.raises(TypeError, match="stopping_criteria must be a list of callables, got StopAtLength"):
        fast.generate(**kw)


def test_user_processor_of_a_builtin_type_replaces_it_like_hf(pair):
    # HF: a user processor of the same type as one generate() builds takes its place
    # (here the user's penalty 3.0 instead of repetition_penalty=1.2), it is not applied twice.
    model, fast = pair
    kw = dict(input_ids=_prompt(), max_new_tokens=10, do_sample=False, repetition_penalty=1.2,
              logits_processor=[RepetitionPenaltyLogitsProcessor(3.0)], return_dict_in_generate=True,
              output_scores=True)
    ref, out = model.generate(**kw), fast.generate(**kw)
    assert torch.equal(ref.sequences, out.sequences)
    for a, b in zip(ref.scores, out.scores):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------ ids dtype

def test_int32_ids_give_int64_sequences_like_hf(pair):
    model, fast = pair
    ids = _prompt().to(torch.int32)
    ref, out = model.generate(input_ids=ids, max_new_tokens=5), fast.generate(input_ids=ids, max_new_tokens=5)
    assert ref.dtype == out.dtype == torch.int64
    assert torch.equal(ref, out)


def test_int32_ids_on_onnxruntime():
    # onnxruntime takes the graphs' int64 ids only; the cast happens once, at the model boundary
    pytest.importorskip("onnxruntime")
    model, fast = optimized("llama", "onnxruntime")
    ids = _prompt().to(torch.int32)
    assert torch.equal(model.generate(input_ids=ids, max_new_tokens=5), fast.generate(input_ids=ids, max_new_tokens=5))
    out = fast(input_ids=ids, logits_to_keep=1)
    ref = model(input_ids=ids.long()).logits[:, -1:]
    torch.testing.assert_close(out.logits, ref, atol=1e-3, rtol=1e-3)
    step = fast(input_ids=ref.argmax(-1).to(torch.int32), past_key_values=out.past_key_values)
    assert step.logits.shape == (2, 1, models.VOCAB)


def test_other_id_dtypes_refused_naming_input_ids(pair):
    model, fast = pair
    for dtype in (torch.int16, torch.float32, torch.bool):
        ids = _prompt().to(dtype)
        assert _raises(lambda: model.generate(input_ids=ids, max_new_tokens=2)) is not None
        with pytest.raises(TypeError, match=f"input_ids .*{dtype}"):
            fast.generate(input_ids=ids, max_new_tokens=2)


# ------------------------------------------------------------------ lengths

@pytest.mark.parametrize("kw", [dict(max_new_tokens=4.0), dict(max_new_tokens=4.5), dict(max_new_tokens=0.5),
                                dict(max_new_tokens=True), dict(max_length=9.0), dict(max_length=9.5)])
def test_float_lengths_like_hf(pair, kw):
    # HF stops once the length reaches max_length (= prompt + max_new_tokens), a float or not:
    # max_new_tokens=4.5 gives 5 tokens, max_length=9.5 with a 6-token prompt gives 4.
    model, fast = pair
    ids = _prompt()
    ref, out = model.generate(input_ids=ids, **kw), fast.generate(input_ids=ids, **kw)
    assert torch.equal(ref, out)


@pytest.mark.parametrize("max_length", [3, 6, 0, -1])
def test_max_length_not_beyond_the_prompt_raises_like_hf(pair, max_length):
    model, fast = pair
    ids = _prompt(length=6)
    err = _raises(lambda: model.generate(input_ids=ids, max_length=max_length))
    assert isinstance(err, ValueError)
    with pytest.raises(ValueError, match=rf"Input length of input_ids is 6, but `max_length` is set to {max_length}"):
        fast.generate(input_ids=ids, max_length=max_length)


# ------------------------------------------------------------------ batch

def test_empty_batch_is_refused_clearly(pair):
    # HF fails inside the model (a reshape of 0 elements); refuse before, saying what was wrong.
    model, fast = pair
    ids = torch.zeros(0, 5, dtype=torch.long)
    assert _raises(lambda: model.generate(input_ids=ids, max_new_tokens=2)) is not None
    with pytest.raises(ValueError, match=r"input_ids is an empty batch, shape \(0, 5\)"):
        fast.generate(input_ids=ids, max_new_tokens=2)
    with pytest.raises(ValueError, match="empty batch"):
        fast(input_ids=ids)


def test_empty_eos_list_like_hf(pair):
    # HF takes eos_token_id=[] as "no eos" when pad_token_id is set, and fails (IndexError)
    # picking the pad from it when it is not.
    model, fast = pair
    ids = _prompt()
    kw = dict(input_ids=ids, max_new_tokens=4, eos_token_id=[], pad_token_id=0)
    assert torch.equal(model.generate(**kw), fast.generate(**kw))
    del kw["pad_token_id"]
    assert _raises(lambda: model.generate(**kw)) is not None
    with pytest.raises(ValueError, match="eos_token_id is an empty list and pad_token_id is not set"):
        fast.generate(**kw)


@pytest.mark.parametrize("name", ["max_length", "num_return_sequences", "num_beams"])
def test_none_where_hf_fails_on_none(pair, name):
    # HF computes with these (max_length + prompt length, max(num_beams, num_return_sequences))
    # and fails on None with a bare TypeError; refuse it too, naming the argument.
    model, fast = pair
    kw = dict(input_ids=_prompt(), **{name: None})
    assert isinstance(_raises(lambda: model.generate(**kw)), TypeError)
    with pytest.raises(TypeError, match=f"{name}=None"):
        fast.generate(**kw)


def test_float_num_return_sequences_is_refused_naming_it(pair):
    model, fast = pair
    kw = dict(input_ids=_prompt(), max_new_tokens=2, do_sample=True, num_return_sequences=2.0)
    assert isinstance(_raises(lambda: model.generate(**kw)), TypeError)
    with pytest.raises(TypeError, match="num_return_sequences must be an int, got 2.0"):
        fast.generate(**kw)


# ------------------------------------------------------------------ attention mask

@pytest.mark.parametrize("dtype", [torch.bool, torch.float32, torch.int32])
def test_mask_dtypes_hf_accepts(pair, dtype):
    model, fast = pair
    ids, mask = models.left_padded_batch(lengths=(7, 3))
    kw = dict(input_ids=ids, attention_mask=mask.to(dtype), max_new_tokens=5, pad_token_id=0)
    assert torch.equal(model.generate(**kw), fast.generate(**kw))


def test_mask_inferred_from_pad_token_id_like_hf(pair):
    # Without an attention_mask HF treats tokens equal to pad_token_id as padding (unless the
    # pad id is also an eos id): a left-padded batch with only pad_token_id must give HF's tokens.
    model, fast = pair
    ids, mask = models.left_padded_batch(lengths=(7, 3))
    ids[mask == 0] = 250
    kw = dict(input_ids=ids, pad_token_id=250, max_new_tokens=6)
    assert torch.equal(model.generate(**kw), fast.generate(**kw))
    kw["eos_token_id"] = [2, 250]  # pad is an eos id: HF does not infer, every token counts
    assert torch.equal(model.generate(**kw), fast.generate(**kw))


def test_inferred_mask_with_holes_is_refused_naming_pad_token_id(pair):
    # HF masks a pad id in the middle of a prompt (a hole); the compiled path cannot, so it refuses.
    _, fast = pair
    ids = torch.tensor([[5, 6, 250, 7]])
    with pytest.raises(ValueError, match="no attention_mask was passed, so, as in HF, every token equal to pad_token_id=250"):
        fast.generate(input_ids=ids, pad_token_id=250, max_new_tokens=2)


def test_mask_on_another_device_is_refused(pair):
    model, fast = pair
    ids = _prompt()
    mask = torch.ones(ids.shape, dtype=torch.long, device="meta")
    assert _raises(lambda: model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2)) is not None
    with pytest.raises(ValueError, match="attention_mask is on meta but input_ids is on cpu"):
        fast.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2)
    with pytest.raises(ValueError, match="attention_mask is on meta"):
        fast(input_ids=ids, attention_mask=mask)


@pytest.mark.parametrize("value", [2, 0.5, -float("inf"), float("nan")])
def test_mask_values_other_than_0_1_are_refused(pair, value):
    # By design stricter than HF: HF runs these but builds its position ids from the mask's
    # cumulative sum, so a mask of 2s or 0.5s gives other tokens than the same prompt with 1s.
    _, fast = pair
    ids = _prompt()
    mask = torch.ones(ids.shape)
    mask[:, 0] = value
    with pytest.raises(ValueError, match="attention_mask must hold only 0 .* and 1"):
        fast.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2)
    with pytest.raises(ValueError, match="attention_mask must hold only 0"):
        fast(input_ids=ids, attention_mask=mask)


def test_mask_shape_and_type_are_checked(pair):
    model, fast = pair
    ids = _prompt()
    for mask in (torch.ones(2, 1, 6, dtype=torch.long), torch.ones(2, 5, dtype=torch.long)):
        assert _raises(lambda: model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2)) is not None
        with pytest.raises(ValueError, match=r"attention_mask shape .* does not match input_ids \(2, 6\)"):
            fast.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2)
    with pytest.raises(TypeError, match="attention_mask must be a torch.Tensor, got list"):
        fast.generate(input_ids=ids, attention_mask=[[1] * 6] * 2, max_new_tokens=2)


# ------------------------------------------------------------------ KV pool message

def test_kv_pool_exhausted_names_real_knobs_and_a_readable_size():
    pool = BlockPool(num_blocks=4, block_size=16, bytes_per_block=4096)  # 3 usable blocks of 4 KiB: "0 MiB" before
    with pytest.raises(KVPoolExhausted) as err:
        pool.allocate(4)
    msg = str(err.value)
    assert "(16-token blocks, 12.0 KiB)" in msg
    assert "kv_cache_memory=" in msg
    assert "config=OptimizeConfig(cache=CacheConfig(kv_cache_blocks=...))" in msg
    # the keywords it names exist
    assert "kv_cache_memory" in inspect.signature(pdcompile.optimize).parameters
    assert "kv_cache_blocks" in {f.name for f in dataclasses.fields(pdcompile.CacheConfig)}
    big = BlockPool(num_blocks=3, block_size=16, bytes_per_block=3 * 2**20)
    with pytest.raises(KVPoolExhausted, match=r"6\.0 MiB"):
        big.allocate(3)
