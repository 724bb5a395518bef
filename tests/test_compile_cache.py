"""The persistent compile cache (pdcompile/compile_cache.py) and the extend graph built in optimize().

One tiny llama is compiled once on onnxruntime into a cache folder of this module; the
other tests read that entry (a new process is served from it), corrupt copies of it,
evict copies of it, or check that the key changes with each of its components.
"""

import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys

import pytest
import torch

import models
import pdcompile
from pdcompile import api, cli
from pdcompile.backends import get_backend
from pdcompile.compile_cache import CompileCache, cache_key, key_components, parse_size

HERE = os.path.dirname(__file__)
ROOT = os.path.dirname(HERE)
KW = dict(max_new_tokens=16, do_sample=False, pad_token_id=0)
OPTS = dict(backend="onnxruntime", max_seq_len=128, max_batch_size=2)


def _prompt():
    # 40 tokens: two full blocks of 16, so a second call with this prompt is a prefix-cache hit
    return torch.randint(3, models.VOCAB, (1, 40), generator=torch.Generator().manual_seed(5))


def _build_logs(records) -> list[str]:
    """Log lines that mean a graph was captured or lowered."""
    return [r.getMessage() for r in records
            if r.getMessage().startswith(("captured ", "compile[", "building the "))]


@pytest.fixture(scope="module")
def cold(tmp_path_factory):
    """(model, optimized, cache folder): one cold optimize() that wrote the cache entry."""
    folder = tmp_path_factory.mktemp("pdcompile-cache")
    model = models.build("llama")
    fast = pdcompile.optimize(model, cache=folder, **OPTS)
    assert "cache hit" not in fast.pdcompile_report().timings
    return model, fast, folder


def test_prefix_cache_hit_builds_nothing(cold, caplog):
    """Extend is built in optimize(): the first prefix-cache hit compiles nothing, and gives HF's tokens."""
    model, fast, _ = cold
    assert "extend" in fast.runner.executor.phases and "extend" not in fast.runner.executor.lazy
    ids = _prompt()
    ref = model.generate(ids, **KW)
    with caplog.at_level(logging.INFO, logger="pdcompile"):
        first = fast.generate(ids, **KW)
        again = fast.generate(ids, **KW)  # its first 32 tokens are in the pool now
    assert fast.last_timings.reused_tokens == (32,)
    assert _build_logs(caplog.records) == []
    assert torch.equal(first, ref) and torch.equal(again, ref)


def test_hit_in_a_new_process(cold):
    """A second optimize() of the same model in a new process loads the entry: nothing is
    captured or lowered, and the tokens (prefix-cache hit included) are HF eager's."""
    model, _, folder = cold
    ids = _prompt()
    ref = model.generate(ids, **KW)
    script = f"""
import json, logging, sys, torch
sys.path.insert(0, {HERE!r})
import models, pdcompile
records = []
handler = logging.Handler(); handler.emit = records.append
logging.getLogger("pdcompile").addHandler(handler); logging.getLogger("pdcompile").setLevel(logging.INFO)
m = pdcompile.optimize(models.build("llama"), cache={str(folder)!r}, **{OPTS!r})
ids = torch.randint(3, models.VOCAB, (1, 40), generator=torch.Generator().manual_seed(5))
outs = [m.generate(ids, **{KW!r}).tolist() for _ in range(2)]
print(json.dumps({{"outs": outs, "reused": list(m.last_timings.reused_tokens),
                  "timings": m.pdcompile_report().timings, "logs": [r.getMessage() for r in records]}}))
"""
    env = {**os.environ, "PYTHONPATH": ROOT, "PDCOMPILE_CACHE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "cache hit" in got["timings"] and not any(k.startswith(("capture", "passes", "compile[")) for k in got["timings"])
    assert any(line.startswith("cache hit: loaded in") for line in got["logs"])
    assert not any(line.startswith(("captured ", "compile[", "building the ")) for line in got["logs"]), got["logs"]
    assert got["reused"] == [32]
    for out in got["outs"]:
        assert torch.equal(torch.tensor(out), ref)


def _key(model, config=None, **changes):
    config = config or api._resolve_config(model, None, "onnxruntime", 2, None, (), paged=True, block_size=16,
                                           prefix_cache=True, kv_cache_memory=None)[0]
    return cache_key(key_components(model, config, 128, "onnxruntime", torch.device("cpu"), api.PIPELINES))


def test_key_misses_on_each_component(monkeypatch):
    model = models.build("llama")
    base = _key(model)
    assert _key(models.build("llama")) == base  # same weights, config and options: same key
    # a changed weight (one element of one layer)
    changed = models.build("llama")
    with torch.no_grad():
        changed.model.layers[1].mlp.down_proj.weight[3, 7] += 1e-3
    assert _key(changed) != base
    # a changed model config (same weights, another RoPE base)
    other = models.build("llama")
    other.config.rope_theta = 5000.0
    assert _key(other) != base
    # a changed pdcompile option: a pass off, another block size, backend options
    config = api._resolve_config(model, None, "onnxruntime", 2, None, (), paged=True, block_size=16,
                                 prefix_cache=True, kv_cache_memory=None)[0]
    assert _key(model, config) == base
    off = dataclasses.replace(config, passes=pdcompile.PassConfig(disabled=frozenset({"prune_final_layer"})))
    blocks = dataclasses.replace(config, cache=dataclasses.replace(config.cache, block_size=32))
    from pdcompile.backends.onnxruntime import OrtOptions

    threads = dataclasses.replace(config, backend_options=OrtOptions(threads=1))
    assert len({base, _key(model, off), _key(model, blocks), _key(model, threads)}) == 4
    # a changed version string
    monkeypatch.setattr(pdcompile, "__version__", "0.0.0-test")
    assert _key(model) != base


def _copy_entry(src: CompileCache, dst: CompileCache, key: str, new_key: str | None = None):
    new_key = new_key or key
    shutil.copytree(src.path(key), dst.path(new_key))
    return dst.path(new_key)


def test_corrupt_entry_is_removed_not_used(cold, tmp_path, caplog):
    """A truncated engine fails the bundle's checks: the lookup is a miss with a warning and the
    entry is gone (optimize() then compiles and writes it again: test_corrupt_entry_rebuilt)."""
    model, fast, folder = cold
    src = CompileCache(folder)
    (entry,) = src.entries()
    store = CompileCache(tmp_path)
    path = _copy_entry(src, store, entry.key)
    with open(path / "decode.onnx", "r+b") as f:
        f.truncate(1000)
    config = api._resolve_config(model, None, "onnxruntime", 2, 128, (), paged=True, block_size=16,
                                 prefix_cache=True, kv_cache_memory=None)[0]
    with caplog.at_level(logging.WARNING, logger="pdcompile"):
        got = api._from_cache(store, entry.key, model, config, get_backend("onnxruntime"), torch.device("cpu"), {}, 0.0)
    assert got is None
    assert any("is unusable" in r.getMessage() and "decode.onnx" in r.getMessage() for r in caplog.records)
    assert not path.exists()


@pytest.mark.slow
def test_corrupt_entry_rebuilt(cold, tmp_path, caplog):
    model, _, folder = cold
    src = CompileCache(folder)
    (entry,) = src.entries()
    store = CompileCache(tmp_path)
    path = _copy_entry(src, store, entry.key)
    (path / "prefill.onnx").write_bytes(b"not onnx")
    with caplog.at_level(logging.INFO, logger="pdcompile"):
        fast = pdcompile.optimize(model, cache=store, **OPTS)
    assert any(r.levelno == logging.WARNING and "is unusable" in r.getMessage() for r in caplog.records)
    assert "compile[onnxruntime:prefill]" in fast.pdcompile_report().timings
    assert [e.key for e in store.entries()] == [entry.key]
    ids = _prompt()
    assert torch.equal(fast.generate(ids, **KW), model.generate(ids, **KW))


@pytest.mark.slow
def test_changed_weight_compiles_again(cold, caplog):
    model, _, folder = cold
    changed = models.build("llama")
    with torch.no_grad():
        changed.lm_head.weight[0, 0] += 0.5
    fast = pdcompile.optimize(changed, cache=folder, **OPTS)
    assert "cache hit" not in fast.pdcompile_report().timings
    assert len(CompileCache(folder).entries()) == 2
    ids = _prompt()
    assert torch.equal(fast.generate(ids, **KW), changed.generate(ids, **KW))


def test_lru_eviction(cold, tmp_path):
    _, _, folder = cold
    src = CompileCache(folder)
    (entry,) = src.entries()
    keys = [f"{i:064x}" for i in range(1, 5)]
    store = CompileCache(tmp_path, limit=int(entry.bytes * 2.5))  # room for two entries
    for i, key in enumerate(keys):
        _copy_entry(src, store, entry.key, key)
        os.utime(store.path(key), (1000 + i, 1000 + i))
    assert store.lookup(keys[0]) is not None  # a hit makes the oldest the most recently used
    removed = store.evict(keep=keys[3])
    assert sorted(removed) == sorted([keys[1], keys[2]])
    assert sorted(e.key for e in store.entries()) == sorted([keys[0], keys[3]])
    assert store.total_bytes() <= store.limit
    # an entry larger than the whole limit is not kept
    tiny = CompileCache(tmp_path / "tiny", limit=100)
    _copy_entry(src, tiny, entry.key)
    assert tiny.evict(keep=entry.key) == [entry.key] and tiny.entries() == []


def test_size_setting():
    assert parse_size("10G") == 10 << 30 and parse_size("512M") == 512 << 20 and parse_size("1234") == 1234
    with pytest.raises(ValueError, match="PDCOMPILE_CACHE_SIZE='ten'"):
        parse_size("ten")


def test_cli_ls_and_clear(cold, tmp_path, capsys):
    _, _, folder = cold
    src = CompileCache(folder)
    (entry,) = src.entries()
    store = CompileCache(tmp_path)
    _copy_entry(src, store, entry.key)
    assert cli.main(["cache", "ls", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "1 entry" in out and entry.key[:16] in out and "onnxruntime" in out and "llama" in out
    assert cli.main(["cache", "clear", "--dir", str(tmp_path)]) == 0
    assert "removed 1 entry" in capsys.readouterr().out
    assert store.entries() == []
    assert cli.main(["cache", "ls", "--dir", str(tmp_path)]) == 0
    assert "0 entries" in capsys.readouterr().out


def test_export_of_a_cache_served_model(cold, tmp_path):
    """A model served from the cache keeps no graphs: export() copies its engines (same backend)."""
    model, _, folder = cold
    served = pdcompile.optimize(model, cache=folder, **OPTS)
    assert served.graphs is None and "cache hit" in served.pdcompile_report().timings
    path = pdcompile.export(served, tmp_path / "b.pdc", backend="onnxruntime")
    loaded = pdcompile.load(path)
    ids = _prompt()
    assert torch.equal(loaded.generate(ids, **KW), model.generate(ids, **KW))
    with pytest.raises(ValueError, match="served from the compile cache with onnxruntime engines"):
        pdcompile.export(served, tmp_path / "c.pdc", backend="inductor")


def test_backends_that_are_not_cached(tmp_path, caplog):
    with caplog.at_level(logging.DEBUG, logger="pdcompile"):
        assert api._compile_cache(tmp_path, "eager") is None
        assert api._compile_cache(tmp_path, "tensorrt") is None
    assert any("eager backend has no engine files to cache" in r.getMessage() for r in caplog.records)
    assert isinstance(api._compile_cache(tmp_path, "onnxruntime"), CompileCache)
    assert api._compile_cache(False, "onnxruntime") is None


@pytest.mark.slow
def test_inductor_entry_served_and_same_tokens(tmp_path):
    """With inductor the cache holds AOTInductor packages: the cold optimize() runs the package
    it wrote, and a second optimize() loads it; both give HF's tokens."""
    model = models.build("llama")
    opts = dict(OPTS, backend="inductor")
    cold = pdcompile.optimize(model, cache=tmp_path, **opts)
    warm = pdcompile.optimize(model, cache=tmp_path, **opts)
    assert "cache hit" not in cold.pdcompile_report().timings and "cache hit" in warm.pdcompile_report().timings
    (entry,) = CompileCache(tmp_path).entries()
    assert entry.backend == "inductor" and (entry.path / "extend.pt2").is_file()
    ids = _prompt()
    ref = model.generate(ids, **KW)
    for fast in (cold, warm):
        assert torch.equal(fast.generate(ids, **KW), ref)
        assert torch.equal(fast.generate(ids, **KW), ref)  # prefix-cache hit: the extend package
        assert fast.last_timings.reused_tokens == (32,)
