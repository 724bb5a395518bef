"""Bad input gets a clear error naming the value and the limit."""

import pytest
import torch

import models
import pdcompile
from conftest import optimized


@pytest.fixture(scope="module")
def fast():
    return optimized("llama", "eager")[1]


def test_prompt_plus_new_tokens_beyond_capacity(fast):
    ids = torch.randint(3, 100, (1, 200))
    with pytest.raises(pdcompile.CapacityError, match=r"200 tokens \+ max_new_tokens=100 = 300 tokens exceeds max_seq_len=256"):
        fast.generate(input_ids=ids, max_new_tokens=100)


def test_batch_beyond_capacity(fast):
    ids = torch.randint(3, 100, (9, 4))
    with pytest.raises(pdcompile.CapacityError, match="batch of 9 sequences exceeds max_batch_size=8"):
        fast.generate(input_ids=ids, max_new_tokens=2)


def test_empty_prompt(fast):
    with pytest.raises(ValueError, match="empty prompt"):
        fast.generate(input_ids=torch.zeros(1, 0, dtype=torch.long), max_new_tokens=2)
    ids, mask = models.left_padded_batch(lengths=(5, 2))
    mask[1] = 0
    with pytest.raises(ValueError, match="row 1 of the batch is an empty prompt"):
        fast.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2)


@pytest.mark.parametrize("bad", [models.VOCAB, 10_000, -1])
def test_token_ids_outside_vocabulary(fast, bad):
    ids = torch.tensor([[5, 6, bad]])
    with pytest.raises(ValueError, match=rf"token id {bad} is outside the vocabulary \[0, {models.VOCAB - 1}\]"):
        fast.generate(input_ids=ids, max_new_tokens=2)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        fast(input_ids=ids)


def test_wrong_dtype_and_device(fast):
    with pytest.raises(TypeError, match="integer tensor"):
        fast.generate(input_ids=torch.ones(1, 3), max_new_tokens=2)
    with pytest.raises(ValueError, match="is on meta but the model is on cpu"):
        fast.generate(input_ids=torch.ones(1, 3, dtype=torch.long, device="meta"), max_new_tokens=2)


def test_right_padding_is_refused(fast):
    ids = torch.tensor([[5, 6, 7, 0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    with pytest.raises(ValueError, match="left padding"):
        fast.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2)


# Models that cannot be captured (encoder-decoders, recurrent layers, export failures):
# test_unsupported.py.


def test_max_seq_len_beyond_the_model():
    model = models.build("llama")  # max_position_embeddings=512
    with pytest.raises(ValueError, match=r"max_seq_len=1000 exceeds .* \(512"):
        pdcompile.optimize(model, backend="eager", max_seq_len=1000)


def test_bad_options():
    model = models.build("llama")
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        pdcompile.optimize(model, backend="nope")
    with pytest.raises(ValueError, match="max_batch_size must be a positive int"):
        pdcompile.optimize(model, backend="eager", max_batch_size=0)


def test_foreign_past_key_values(fast):
    from transformers import DynamicCache

    with pytest.raises(TypeError, match="past_key_values must be the cache a previous call of this model returned"):
        fast(input_ids=torch.tensor([[5]]), past_key_values=DynamicCache())


def test_decode_step_needs_one_token_per_row(fast):
    out = fast(input_ids=torch.tensor([[5, 6, 7]]), logits_to_keep=1)
    with pytest.raises(NotImplementedError, match="one token per row"):
        fast(input_ids=torch.tensor([[5, 6]]), past_key_values=out.past_key_values)


def test_module_without_config_is_refused_before_anything_reads_it():
    class NotHF(torch.nn.Module):
        def forward(self, x):
            return x

    with pytest.raises(pdcompile.UnsupportedModelError, match=r"NotHF cannot be captured \(phase: check\): it has no `.config`"):
        pdcompile.optimize(NotHF())
