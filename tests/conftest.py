import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

import models  # noqa: E402

# The persistent compile cache is off for the suite: a test that compiles must compile, not
# load what an earlier run (or test) left in ~/.cache. tests/test_compile_cache.py turns it
# on with a folder of its own.
os.environ["PDCOMPILE_CACHE"] = "0"

import pdcompile  # noqa: E402

# Under pytest-xdist (make test: two workers), each worker gets its share of the cores, so
# the workers' torch and onnxruntime thread pools (onnxruntime sessions default to torch's
# thread count) do not oversubscribe the machine.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _WORKERS))

# Compiling is the expensive part of the suite: each (family, backend, options) is
# optimized once per session and shared by every test that needs it.
_CACHE: dict = {}


def optimized(family: str, backend: str, **options):
    options.setdefault("max_seq_len", 256)
    # optimize() builds the extend graph (prefix-cache hits) up front, a third capture and
    # lowering. The suite's prefix-cache tests run on llama; the other families' prompts are
    # shorter than one block, so their models are built without it unless a test asks.
    if family != "llama":
        options.setdefault("prefix_cache", False)
    key = (family, backend, tuple(sorted(options.items())))
    if key not in _CACHE:
        model = models.build(family, backend=backend)
        _CACHE[key] = (model, pdcompile.optimize(model, backend=backend, **options))
    return _CACHE[key]


@pytest.fixture
def llama_eager():
    return optimized("llama", "eager")


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield
