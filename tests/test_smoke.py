"""The smoke subset: what must hold on every transformers release pdcompile supports.

CI runs it on the oldest supported transformers (``make test-oldest``), and
``make test-latest`` runs it on the newest the registry serves, unpinned, so that one
command shows whether a new release breaks pdcompile. The default suite runs it too.
Parity on three families of different shapes (grouped-query Llama, Qwen2 with qkv bias,
GPT-2 with Conv1D and learned positions), one bundle round trip in a fresh process,
and the demo path on the R1 reference model.
"""

import subprocess
import sys

import pytest
import torch

import models
import test_parity
from conftest import optimized

pytestmark = pytest.mark.smoke


@pytest.mark.parametrize("backend", ["eager", "onnxruntime"])
@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_parity_smoke(family, backend):
    test_parity.test_greedy_parity(family, 3, backend)


def test_bundle_round_trip_smoke(tmp_path):
    import pdcompile

    model, fast = optimized("qwen2", "onnxruntime")
    path = pdcompile.export(fast, tmp_path / "q.pdc", backend="onnxruntime")
    ids, mask = models.left_padded_batch(lengths=(7, 4))
    ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0)
    torch.save({"ids": ids, "mask": mask}, tmp_path / "in.pt")
    code = (
        "import sys, torch, pdcompile\n"
        f"d = torch.load({str(tmp_path / 'in.pt')!r})\n"
        f"m = pdcompile.load({str(path)!r})\n"
        "out = m.generate(input_ids=d['ids'], attention_mask=d['mask'], max_new_tokens=16, do_sample=False, pad_token_id=0)\n"
        "print(out.tolist())\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert eval(proc.stdout.strip().splitlines()[-1]) == ref.tolist()


def test_demo_path_r1_smoke():
    """`pdcompile run --model r1`: optimize, generate, same tokens as HF eager, timings printed."""
    proc = subprocess.run(
        [sys.executable, "-m", "pdcompile", "run", "--model", "r1", "--max-new-tokens", "8", "--repeats", "1"],
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "identical" in proc.stdout.lower() and "ttft" in proc.stdout.lower(), proc.stdout[-2000:]
