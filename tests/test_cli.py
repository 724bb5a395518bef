"""The command line on a model folder: inspect and export."""

import json
import subprocess
import sys

import pytest

import models


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "tiny-llama"
    models.build("llama").save_pretrained(path)
    models.word_tokenizer().save_pretrained(path)
    return path


def _cli(*args):
    proc = subprocess.run([sys.executable, "-m", "pdcompile", *args], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def test_inspect_shows_passes_and_dumps(model_dir, tmp_path):
    out = _cli("inspect", str(model_dir), "--dump", str(tmp_path / "dump"), "--json", str(tmp_path / "r.json"))
    for name in ("fuse_causal_mask", "prune_final_layer", "decode_attention_mask", "applied"):
        assert name in out
    assert "prefill:" in out and "fewer" in out
    report = json.loads((tmp_path / "r.json").read_text())
    assert [r["name"] for r in report["phases"]["prefill"]] == ["remove_noops", "fuse_causal_mask", "prune_final_layer", "paged_kv"]
    assert sorted(p.name for p in (tmp_path / "dump" / "prefill").iterdir())[0] == "00_captured_graph.txt"


def test_export_writes_a_loadable_bundle(model_dir, tmp_path):
    out = _cli("export", str(model_dir), str(tmp_path / "b.pdc"), "--backend", "onnxruntime", "--max-seq-len", "128")
    assert "wrote" in out
    manifest = json.loads((tmp_path / "b.pdc" / "manifest.json").read_text())
    assert manifest["limits"]["max_seq_len"] == 128 and "tokenizer.json" in manifest["files"]
