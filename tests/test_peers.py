"""The bench's peers give HF eager's greedy tokens, with one increasing timestamp per new token.

One tiny llama for every peer (compiling and exporting are the slow parts: about 25 s per
inductor compilation and 12 s per ONNX export on 2 cores).
"""

import time

import models
import pytest
import torch

from pdcompile.peers import ExportersOnnx, HFEager, HFStaticCompile, compiled_graph_count

NEW_TOKENS = 16


@pytest.fixture(scope="module")
def llama():
    return models.build("llama")


def batch1():
    ids = torch.randint(3, models.VOCAB, (1, 7), generator=torch.Generator().manual_seed(3))
    return ids, torch.ones_like(ids)


def batch3():
    return models.left_padded_batch()  # rows of 11, 6 and 3 tokens, left-padded


def check(peer, model, ids, mask):
    """The peer's sequences are HF eager's; one token time per new token, increasing."""
    with torch.no_grad():
        expected = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert expected.shape[1] == ids.shape[1] + NEW_TOKENS  # no early EOS: all 16 tokens are compared
    start = time.perf_counter()
    sequences, times = peer.generate(ids, mask, NEW_TOKENS)
    assert torch.equal(sequences, expected)
    assert len(times) == NEW_TOKENS
    assert start < times[0] and all(a < b for a, b in zip(times, times[1:]))


def test_hf_eager(llama):
    peer = HFEager(llama)
    assert peer.prepare() >= 0
    check(peer, llama, *batch1())
    check(peer, llama, *batch3())


def test_hf_static_compile_runs_compiled(llama):
    peer = HFStaticCompile(llama)
    ids, mask = batch1()
    prepare_s = peer.prepare(ids, mask, NEW_TOKENS)
    assert peer.graphs_compiled >= 2  # prefill and decode, compiled by inductor in the warm-up

    # Same shapes again: no new graph, so generate ran the compiled ones (fullgraph=True:
    # no eager fallback in between), and faster than the run that traced and compiled
    # them (a loose ratio: inductor's on-disk cache and a busy machine narrow the gap).
    before = compiled_graph_count()
    start = time.perf_counter()
    peer.generate(ids, mask, NEW_TOKENS)
    steady_s = time.perf_counter() - start
    assert compiled_graph_count() == before
    assert prepare_s > 2 * steady_s

    check(peer, llama, ids, mask)
    # The caller's model was not touched: its forward is still the class's (eager) one.
    assert "forward" not in vars(llama)
    assert llama.generation_config.cache_implementation is None

    # A batch of 3 is a new static cache shape: HF's recipe recompiles (~25 s more).
    check(peer, llama, *batch3())


def test_exporters_onnx(llama):
    peer = ExportersOnnx(llama)
    assert peer.prepare() > 0
    check(peer, llama, *batch1())
    check(peer, llama, *batch3())
    assert "forward" not in vars(llama)  # exported from a copy


def test_exporters_onnx_fused_refuses_left_padding(llama):
    peer = ExportersOnnx(llama, ort_fusions="cpu")
    peer.prepare()
    check(peer, llama, *batch1())
    with pytest.raises(NotImplementedError, match="left-padded"):
        peer.generate(*batch3(), NEW_TOKENS)
