"""The command line on a model folder: inspect and export."""

import json
import re
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


def _run(*args):
    proc = subprocess.run([sys.executable, "-m", "pdcompile", *args], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def _cli(*args):
    return _run(*args).stdout


# Third-party output the demo must not show without -v: Python warnings, torch's
# glog-style log lines ("W1125 13:53:12.99 ..."), torch.onnx progress, progress bars.
NOISE = re.compile(r"Warning|^\[torch\.onnx\]|^[WE]\d{4} |torchvision|Loading weights|it/s\]", re.M)


def test_run_is_quiet_and_compares_cold_with_cold(model_dir):
    prompt = " ".join(f"w{i}" for i in range(5, 45))  # long enough for prefix-cache blocks
    proc = _run("run", "--model", str(model_dir), "--backend", "onnxruntime", "--max-new-tokens", "4",
                "--repeats", "1", "--prompt", prompt)
    noise = NOISE.findall(proc.stdout + proc.stderr)
    assert not noise, f"third-party noise {noise} in:\n{proc.stdout}\n{proc.stderr}"
    out = " ".join(proc.stdout.split())  # the table title may wrap
    assert "Tokens identical to HF eager: True" in out
    # the timed comparison is cold for both systems; the prefix cache has its own line
    assert "cold prompts (no prefix-cache reuse)" in out
    cached = re.search(r"Cached-prefix TTFT \(separate from the cold comparison\).*first (\d+) of the (\d+) prompt "
                       r"tokens.*: [\d.]+ ms \(cold: [\d.]+ ms\)", out)
    assert cached and 0 < int(cached.group(1)) < int(cached.group(2)), proc.stdout


def test_inspect_shows_passes_and_dumps(model_dir, tmp_path):
    out = _cli("inspect", str(model_dir), "--dump", str(tmp_path / "dump"), "--json", str(tmp_path / "r.json"))
    for name in ("fuse_causal_mask", "prune_final_layer", "decode_attention_mask", "applied"):
        assert name in out
    assert "prefill:" in out and "fewer" in out
    report = json.loads((tmp_path / "r.json").read_text())
    assert [r["name"] for r in report["phases"]["prefill"]] == ["remove_noops", "fuse_causal_mask", "prune_final_layer", "paged_kv",
                                                                     "quantize_weights", "bf16_matmuls"]
    assert sorted(p.name for p in (tmp_path / "dump" / "prefill").iterdir())[0] == "00_captured_graph.txt"


def test_export_writes_a_loadable_bundle(model_dir, tmp_path):
    """export --sign, verify --public-key, generate from the bundle; a modified bundle fails
    verify with the field named and exit status 2."""
    pytest.importorskip("cryptography", reason="export --sign needs the cryptography package (pdcompile[sign])")
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    key = ed25519.Ed25519PrivateKey.generate()
    (tmp_path / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    (tmp_path / "key.pub").write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                                      serialization.PublicFormat.OpenSSH))
    bundle, pub = str(tmp_path / "b.pdc"), str(tmp_path / "key.pub")
    out = _cli("export", str(model_dir), bundle, "--backend", "onnxruntime", "--max-seq-len", "128",
               "--sign", str(tmp_path / "key.pem"))
    assert "wrote" in out and "signed" in out
    manifest = json.loads((tmp_path / "b.pdc" / "manifest.json").read_text())
    assert manifest["limits"]["max_seq_len"] == 128 and "tokenizer.json" in manifest["files"]
    out = _cli("verify", bundle, "--public-key", pub)
    assert "match their sha256" in out and "signature verified" in out and "native code: no" in out
    out = _cli("generate", bundle, "--prompt", "w5 w6 w7", "--max-new-tokens", "4", "--public-key", pub)
    words = out.strip().splitlines()[-1].split()  # the text is the last line, after the progress log
    assert 1 <= len(words) <= 4 and all(re.fullmatch(r"w[0-9]+", w) for w in words)

    manifest["limits"]["max_seq_len"] = 4096
    (tmp_path / "b.pdc" / "manifest.json").write_text(json.dumps(manifest))
    proc = subprocess.run([sys.executable, "-m", "pdcompile", "verify", bundle], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and "manifest field limits.max_seq_len was changed" in proc.stderr
    assert "Traceback" not in proc.stderr
