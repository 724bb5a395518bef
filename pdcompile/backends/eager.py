"""The reference backend: run the transformed FX graph as it is.

No compilation: every aten op and every ``pdcompile::`` op runs its eager kernel.
It is what the other backends are checked against, and what to use when debugging a
pass (``PDCOMPILE_DUMP_DIR`` shows the graphs it runs). It has no engine file format.
"""

from __future__ import annotations

import torch

from . import Backend


class EagerBackend(Backend):
    name = "eager"
    exportable = False
    native_code = False

    def lower(self, gm: torch.fx.GraphModule, ctx) -> torch.fx.GraphModule:
        return gm
