"""The embedded real model (SmolLM2-135M-Instruct): greedy text identical to HF eager."""

import pytest
import torch

import pdcompile
from pdcompile import models

PROMPTS = ["What is the capital of France?", "Write a haiku about compilers and the sea."]


@pytest.fixture(scope="module")
def smollm2():
    model, tok = models.load_smollm2()
    tok.padding_side = "left"
    return model, tok


def _encode(tok, prompts):
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False) for p in prompts]
    return tok(texts, return_tensors="pt", padding=True)


def _check(smollm2, backend):
    model, tok = smollm2
    # no prefix cache: no extend graph to build (a third SmolLM2 lowering); prefix-cache hits
    # are checked on the tiny models
    fast = pdcompile.optimize(model, backend=backend, max_batch_size=2, max_seq_len=512, prefix_cache=False)
    inputs = _encode(tok, PROMPTS)
    with torch.no_grad():
        ref = model.generate(**inputs, max_new_tokens=48, do_sample=False)
    out = fast.generate(**inputs, max_new_tokens=48, do_sample=False)
    width = inputs["input_ids"].shape[1]
    ref_text = tok.batch_decode(ref[:, width:], skip_special_tokens=True)
    out_text = tok.batch_decode(out[:, width:], skip_special_tokens=True)
    assert out_text == ref_text
    assert torch.equal(out, ref)
    assert "Paris" in out_text[0]  # the real weights loaded, not noise


def test_smollm2_greedy_text_identical_eager(smollm2):
    _check(smollm2, "eager")


@pytest.mark.slow
def test_smollm2_greedy_text_identical_inductor(smollm2):
    _check(smollm2, "inductor")


def test_smollm2_greedy_text_identical_onnxruntime(smollm2):
    """The default CPU backend on the real checkpoint."""
    _check(smollm2, "onnxruntime")


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["onnxruntime", "inductor"])
def test_smollm2_bundle_loads_in_fresh_process(smollm2, backend, tmp_path):
    """Export the default model (ONNX / AOTInductor package), load it in a new process
    without the HF model, generate: the text is HF eager's."""
    import json
    import subprocess
    import sys

    model, tok = smollm2
    fast = pdcompile.optimize(model, backend="eager", max_batch_size=2, max_seq_len=512)
    path = pdcompile.export(fast, tmp_path / f"smollm2-{backend}.pdc", backend=backend, tokenizer=tok)
    inputs = _encode(tok, PROMPTS)
    with torch.no_grad():
        ref = model.generate(**inputs, max_new_tokens=32, do_sample=False)
    width = inputs["input_ids"].shape[1]
    ref_text = tok.batch_decode(ref[:, width:], skip_special_tokens=True)
    script = (
        "import json, pdcompile\n"
        "from transformers import AutoTokenizer\n"
        f"m = pdcompile.load({str(path)!r}, trust_native_code=True)\n"
        f"tok = AutoTokenizer.from_pretrained({str(path)!r}, padding_side='left')\n"
        f"texts = [tok.apply_chat_template([{{'role': 'user', 'content': p}}], add_generation_prompt=True, tokenize=False) for p in {PROMPTS!r}]\n"
        "inputs = tok(texts, return_tensors='pt', padding=True)\n"
        "out = m.generate(**inputs, max_new_tokens=32, do_sample=False)\n"
        "print(json.dumps(tok.batch_decode(out[:, inputs['input_ids'].shape[1]:], skip_special_tokens=True)))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == ref_text
