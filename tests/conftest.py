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
