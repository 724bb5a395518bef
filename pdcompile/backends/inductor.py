"""Inductor backend: C++/OpenMP kernels on CPU, Triton on GPU.

In process, the phase graph is compiled with ``torch._inductor.compile_fx``
(AOT-autograd functionalises it; inductor's re-inplacing turns the cache writes back
into in-place kernels). For bundles, the phase is compiled ahead of time into an
AOTInductor package (``.pt2``: generated C++ compiled to a shared library with the
weights inside), which loads without recompiling and without Python pickles.
``pdcompile::`` ops are decomposed to aten in both paths.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import torch

from ..ops import DECOMPOSITIONS
from . import Backend
from .program import copy_graph_module, export_program

logger = logging.getLogger(__name__)



class InductorBackend(Backend):
    name = "inductor"
    native_code = True  # an AOTInductor package is a shared library

    def lower(self, gm: torch.fx.GraphModule, ctx) -> Callable:
        # compile_fx rewrites a graph that returns one tensor to return a list, in place; the
        # model keeps ``gm`` for export(), where a list output would become the AOTInductor
        # package's output too. It compiles a copy (parameters are shared, not copied).
        gm = copy_graph_module(gm)
        with torch.no_grad():  # an inference graph: no autograd partitioning
            return compile_graph(gm, [n.meta["val"] for n in gm.graph.nodes if n.op == "placeholder"])

    def save(self, gm: torch.fx.GraphModule, ctx, folder: Path) -> dict:
        """AOTInductor package ``<phase>.pt2`` in ``folder``."""
        ep = export_program(_with_reference_attention(gm), ctx)
        name = f"{ctx.phase}.pt2"
        with torch.no_grad():
            torch._inductor.aoti_compile_and_package(ep, package_path=str(Path(folder) / name))
        return {"files": [name]}

    def load(self, folder: Path, entry: dict, ctx) -> Callable:
        return PackagePhase(torch._inductor.aoti_load_package(str(Path(folder) / entry["files"][0])))


def compile_graph(gm: torch.fx.GraphModule, example_inputs) -> Callable:
    """Inductor on ``gm`` with the ``pdcompile::`` ops decomposed (also Dynamo's backend)."""
    from torch._inductor.compile_fx import compile_fx
    from torch._inductor.decomposition import select_decomp_table

    return compile_fx(gm, example_inputs, decompositions={**select_decomp_table(), **DECOMPOSITIONS})


def _with_reference_attention(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of ``gm`` whose ``pdcompile::`` ops are their aten references (traced by the export)."""
    gm = copy_graph_module(gm)
    for node in gm.graph.nodes:
        if node.target in DECOMPOSITIONS:
            node.target = DECOMPOSITIONS[node.target]
    gm.recompile()
    return gm


class PackagePhase:
    """Callable running one AOTInductor package: ``(ids, idx, *caches) -> logits``.

    A package returns its graph's output structure: ``[logits]`` for packages exported
    from a graph that had been compiled in process before this was fixed (see
    ``compile_phase``); the runtime wants the tensor.
    """

    def __init__(self, package):
        self.package = package

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        out = self.package(*inputs)
        return out[0] if isinstance(out, (list, tuple)) else out
