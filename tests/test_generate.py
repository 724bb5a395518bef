"""The drop-in surface of generate() / forward(), each item against HF eager on the same inputs."""

import threading
import warnings

import pytest
import torch
from transformers import GenerationConfig, TextIteratorStreamer, TextStreamer
from transformers.generation import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

import models
from conftest import optimized


@pytest.fixture(scope="module")
def pair():
    return optimized("llama", "eager")


def _prompt(batch=1):
    return models.left_padded_batch(lengths=(9,)) if batch == 1 else models.left_padded_batch(lengths=(11, 6, 3))


def _both(pair, **kw):
    model, fast = pair
    return model.generate(**kw), fast.generate(**kw)


# ------------------------------------------------------------------ sampling

def test_sampling_same_seed_same_tokens_and_matches_hf(pair):
    ids, mask = _prompt(3)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=24, do_sample=True, temperature=0.8, top_k=20, top_p=0.9, pad_token_id=0)
    model, fast = pair
    torch.manual_seed(123)
    a = fast.generate(**kw)
    torch.manual_seed(123)
    b = fast.generate(**kw)
    torch.manual_seed(123)
    ref = model.generate(**kw)
    assert torch.equal(a, b)
    # HF draws one multinomial per step from the same RNG: identical logits give identical samples.
    assert torch.equal(a, ref)
    torch.manual_seed(124)
    c = fast.generate(**kw)
    assert not torch.equal(a, c), "a different seed should give a different sample"


def test_sampling_distribution_matches_processed_softmax(pair):
    model, fast = pair
    ids, mask = _prompt(1)
    temperature, top_k = 0.7, 8
    logits = model(input_ids=ids, attention_mask=mask).logits[0, -1] / temperature
    top = torch.topk(logits, top_k)
    probs = torch.zeros_like(logits)
    probs[top.indices] = torch.softmax(top.values, dim=-1)
    batch = ids.repeat(8, 1)
    torch.manual_seed(0)
    counts = torch.zeros_like(probs)
    for _ in range(60):
        out = fast.generate(input_ids=batch, attention_mask=mask.repeat(8, 1), max_new_tokens=1, do_sample=True,
                            temperature=temperature, top_k=top_k, pad_token_id=0)
        counts += torch.bincount(out[:, -1], minlength=probs.numel()).float()
    empirical = counts / counts.sum()
    assert set(empirical.nonzero().flatten().tolist()) <= set(top.indices.tolist())
    tv = 0.5 * (empirical - probs).abs().sum().item()
    assert tv < 0.1, f"total variation {tv:.3f} between sampled and expected first-token distribution"


def test_top_k_1_sampling_is_greedy(pair):
    ids, mask = _prompt(3)
    _, fast = pair
    greedy = fast.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0)
    sampled = fast.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=True, top_k=1, pad_token_id=0)
    assert torch.equal(greedy, sampled)


# ------------------------------------------------------------------ lengths, eos, pad

def test_max_length_counts_the_prompt(pair):
    ids, mask = _prompt(3)
    ref, out = _both(pair, input_ids=ids, attention_mask=mask, max_length=20, do_sample=False, pad_token_id=0)
    assert out.shape == (3, 20)
    assert torch.equal(ref, out)


def test_default_length_from_generation_config(pair):
    ids, mask = _prompt(1)
    ref, out = _both(pair, input_ids=ids, attention_mask=mask, do_sample=False, pad_token_id=0)
    assert out.shape == ref.shape
    assert torch.equal(ref, out)


@pytest.mark.parametrize("multi", [False, True])
def test_eos_stops_rows_and_pads(pair, multi):
    model, fast = pair
    ids, mask = _prompt(3)
    free = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=30, do_sample=False, pad_token_id=0)
    gen = free[:, ids.shape[1]:]
    # eos = a token row 0 emits at step 5 (and, for the list form, one row 2 emits at step 12)
    eos = [int(gen[0, 5]), int(gen[2, 12])] if multi else int(gen[0, 5])
    ref, out = _both(pair, input_ids=ids, attention_mask=mask, max_new_tokens=30, do_sample=False, eos_token_id=eos, pad_token_id=7)
    assert torch.equal(ref, out)
    first = eos[0] if multi else eos
    row0 = out[0, ids.shape[1]:].tolist()
    stop = row0.index(first)
    assert all(t == 7 for t in row0[stop + 1:]), "a finished row must continue with pad_token_id"


def test_all_rows_finish_early(pair):
    model, fast = pair
    ids, mask = _prompt(1)
    free = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    eos = int(free[0, ids.shape[1] + 3])
    ref, out = _both(pair, input_ids=ids, attention_mask=mask, max_new_tokens=30, do_sample=False, eos_token_id=eos)
    assert out.shape[1] < ids.shape[1] + 30
    assert torch.equal(ref, out)


# ------------------------------------------------------------------ configs, processors, stopping

def test_generation_config_object_and_kwarg_override(pair):
    ids, mask = _prompt(3)
    cfg = GenerationConfig(max_new_tokens=12, do_sample=False, pad_token_id=0, repetition_penalty=1.3)
    ref, out = _both(pair, input_ids=ids, attention_mask=mask, generation_config=cfg)
    assert torch.equal(ref, out)
    ref, out = _both(pair, input_ids=ids, attention_mask=mask, generation_config=cfg, max_new_tokens=5)
    assert out.shape[1] == ids.shape[1] + 5
    assert torch.equal(ref, out)


@pytest.mark.parametrize("options", [
    dict(repetition_penalty=1.5),
    dict(no_repeat_ngram_size=2),
    dict(min_new_tokens=20, eos_token_id=5),
    dict(bad_words_ids=[[17], [40]]),
    dict(suppress_tokens=[17, 50]),
])
def test_logits_processors_match_hf(pair, options):
    ids, mask = _prompt(3)
    ref, out = _both(pair, input_ids=ids, attention_mask=mask, max_new_tokens=24, do_sample=False, pad_token_id=0, **options)
    assert torch.equal(ref, out)


def test_user_logits_processor_and_stopping_criteria(pair):
    class Ban(LogitsProcessor):
        def __call__(self, input_ids, scores):
            scores[:, 17] = -float("inf")
            return scores

    class StopAt(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= 15, dtype=torch.bool)

    ids, mask = _prompt(1)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=30, do_sample=False, pad_token_id=0,
              logits_processor=LogitsProcessorList([Ban()]), stopping_criteria=StoppingCriteriaList([StopAt()]))
    ref, out = _both(pair, **kw)
    assert out.shape[1] == 15
    assert 17 not in out[0, ids.shape[1]:].tolist()
    assert torch.equal(ref, out)


def test_num_return_sequences(pair):
    ids, mask = _prompt(1)
    model, fast = pair
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=True, num_return_sequences=3, pad_token_id=0)
    torch.manual_seed(5)
    ref = model.generate(**kw)
    torch.manual_seed(5)
    out = fast.generate(**kw)
    assert out.shape == (3, ids.shape[1] + 10)
    assert torch.equal(ref, out)


# ------------------------------------------------------------------ outputs, streamers

def test_return_dict_in_generate_scores_and_logits(pair):
    ids, mask = _prompt(3)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0,
              return_dict_in_generate=True, output_scores=True, output_logits=True, repetition_penalty=1.2)
    ref, out = _both(pair, **kw)
    assert type(out).__name__ == type(ref).__name__
    assert torch.equal(ref.sequences, out.sequences)
    assert len(out.scores) == len(ref.scores) == 8
    for a, b in zip(ref.scores, out.scores):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
    for a, b in zip(ref.logits, out.logits):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)


def test_text_streamer_prints_what_hf_prints(pair, capsys):
    tok = models.word_tokenizer()
    ids, mask = _prompt(1)
    model, fast = pair
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    model.generate(streamer=TextStreamer(tok, skip_prompt=True), **kw)
    ref_text = capsys.readouterr().out
    fast.generate(streamer=TextStreamer(tok, skip_prompt=True), **kw)
    text = capsys.readouterr().out
    assert text == ref_text
    assert len(text.split()) == 12


def test_text_iterator_streamer(pair):
    tok = models.word_tokenizer()
    ids, mask = _prompt(1)
    model, fast = pair
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    expected = tok.decode(model.generate(**kw)[0, ids.shape[1]:])
    streamer = TextIteratorStreamer(tok, skip_prompt=True)
    thread = threading.Thread(target=fast.generate, kwargs=dict(streamer=streamer, **kw))
    thread.start()
    chunks = list(streamer)
    thread.join()
    assert "".join(chunks).strip() == expected.strip()
    assert len(chunks) > 1, "tokens must arrive incrementally"


# ------------------------------------------------------------------ forward

def test_forward_logits_hf_shaped(pair):
    model, fast = pair
    ids, mask = _prompt(3)
    ref = model(input_ids=ids, attention_mask=mask).logits
    out = fast(input_ids=ids, attention_mask=mask).logits
    assert out.shape == ref.shape
    real = mask.bool()
    torch.testing.assert_close(out[real], ref[real], atol=1e-4, rtol=1e-4)
    last = fast(input_ids=ids, attention_mask=mask, logits_to_keep=1).logits
    assert last.shape == (3, 1, ref.shape[-1])
    torch.testing.assert_close(last[:, 0], ref[:, -1], atol=1e-4, rtol=1e-4)


def test_manual_decode_loop_with_past_key_values(pair):
    model, fast = pair
    ids, mask = _prompt(3)
    ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    out = fast(input_ids=ids, attention_mask=mask, logits_to_keep=1)
    tokens = []
    for _ in range(10):
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(nxt)
        out = fast(input_ids=nxt, past_key_values=out.past_key_values)
    assert torch.equal(torch.cat(tokens, dim=1), ref[:, ids.shape[1]:])


def test_attributes_pass_through(pair):
    model, fast = pair
    assert fast.config is model.config
    assert fast.generation_config is model.generation_config
    assert fast.device == model.device
    assert fast.dtype == model.dtype


# ------------------------------------------------------------------ features not served

def test_beam_search_falls_back_with_warning(pair):
    ids, mask = _prompt(1)
    model, fast = pair
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=8, num_beams=3, do_sample=False, pad_token_id=0)
    ref = model.generate(**kw)
    with pytest.warns(UserWarning, match="generation mode 'beam_search'"):
        out = fast.generate(**kw)
    assert torch.equal(ref, out)


def test_served_call_does_not_warn(pair):
    ids, mask = _prompt(1)
    _, fast = pair
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        fast.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)


def test_processors_run_on_one_thread_and_thread_count_is_restored(pair):
    """The per-step logits work runs with torch on one thread (see generation._one_thread:
    spinning OpenMP workers would take the cores of the next graph run), and the caller's
    thread count is back afterwards, also when a processor raises."""
    seen = []

    class Record(LogitsProcessor):
        def __call__(self, input_ids, scores):
            seen.append(torch.get_num_threads())
            return scores

    class Fail(LogitsProcessor):
        def __call__(self, input_ids, scores):
            raise RuntimeError("processor failed")

    _, fast = pair
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        ids, mask = _prompt(1)
        fast.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0,
                      logits_processor=[Record()])
        assert seen == [1] * 4
        assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError, match="processor failed"):
            fast.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0,
                          logits_processor=[Fail()])
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
