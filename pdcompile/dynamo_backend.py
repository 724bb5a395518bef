"""``torch.compile(model, backend="pdcompile")``: pdcompile's lowering as a Dynamo backend.

Dynamo hands over arbitrary sub-graphs of a forward (no phase contract: which input
is a position, which a cache), so the phase-specific passes of ``optimize()`` cannot
apply here; what Dynamo gets is pdcompile's lowering: the backend registry, with the
``pdcompile::`` decompositions, inductor by default::

    torch.compile(model, backend="pdcompile")                               # inductor
    torch.compile(model, backend="pdcompile", options={"backend": "eager"})  # reference

For prefill/decode graphs, graph passes and the generate() runtime, use
:func:`pdcompile.optimize`. Registered through the ``torch_dynamo_backends`` entry point.
"""

from __future__ import annotations

import torch


def pdcompile_backend(gm: torch.fx.GraphModule, example_inputs, options: dict | None = None):
    options = dict(options or {})
    backend = options.pop("backend", "inductor")
    if options:
        raise ValueError(f"unknown pdcompile backend options {sorted(options)}; supported: 'backend'")
    if backend == "eager":
        return gm.forward
    if backend != "inductor":
        raise ValueError(f"torch.compile(backend='pdcompile') supports options backend='inductor' or 'eager', got {backend!r}")
    from .backends.inductor import compile_graph

    return compile_graph(gm, example_inputs)
