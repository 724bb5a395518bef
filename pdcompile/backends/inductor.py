"""Inductor backend: C++/OpenMP kernels on CPU, Triton on GPU.

The phase graph is compiled with ``torch._inductor.compile_fx`` (AOT-autograd
functionalises it, so the in-place cache writes become in-place kernels again after
inductor's re-inplacing). ``pdcompile::`` ops are decomposed to aten first.
"""

from __future__ import annotations

import logging

import torch

from ..ops import DECOMPOSITIONS

logger = logging.getLogger(__name__)


def compile_phase(gm: torch.fx.GraphModule, phase: str, example_inputs, options: dict):
    from torch._inductor.compile_fx import compile_fx

    fake_inputs = [n.meta["val"] for n in gm.graph.nodes if n.op == "placeholder"]
    decomps = dict(torch._inductor.decomposition.select_decomp_table())
    decomps.update(DECOMPOSITIONS)
    with torch.no_grad():  # an inference graph: no autograd partitioning
        compiled = compile_fx(gm, fake_inputs, decompositions=decomps)
    return compiled
