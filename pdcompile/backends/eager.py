"""The reference backend: run the transformed FX graph as it is.

No compilation: every aten op and every ``pdcompile::`` op runs its eager kernel.
It is what the other backends are checked against, and what to use when debugging a
pass (``PDCOMPILE_DUMP_DIR`` shows the graphs it runs).
"""

from __future__ import annotations

import torch


def compile_phase(gm: torch.fx.GraphModule, phase: str, example_inputs, options: dict) -> torch.fx.GraphModule:
    return gm
