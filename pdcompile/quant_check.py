"""Per-layer error of a quantized phase graph against fp32 (``pdcompile inspect --check``).

The graph runs once on a random prompt; at every linear the quantize_weights pass
rewrote, the layer is also computed with its original fp32 weight on the same input
(the quantized graph's own activation), and the relative error of the output is
recorded: ``||y_quantized - y_fp32|| / ||y_fp32||``. Errors therefore include what the
layers before passed on, as the deployed graph sees them.
"""

from __future__ import annotations

import torch

from .cost import example_inputs
from .passes.quantize_weights import FP32_WEIGHT
from .passes.utils import attr
from .phase import Role


class _Probe(torch.fx.Interpreter):
    def __init__(self, gm):
        super().__init__(gm)
        self.rows = []

    def run_node(self, n):
        out = super().run_node(n)
        source = n.meta.get(FP32_WEIGHT)
        if source is not None:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            bias = args[4] if n.target is torch.ops.pdcompile.weight_only_linear.default else (
                args[2] if len(args) > 2 else kwargs.get("bias"))
            ref = torch.nn.functional.linear(args[0], attr(self.module, source), bias)
            err = float((out - ref).float().norm() / ref.float().norm().clamp_min(1e-30))
            self.rows.append({"layer": source, "out_features": int(ref.shape[-1]), "rel_error": err})
        return out


@torch.no_grad()
def layer_errors(gm: torch.fx.GraphModule, signature, vocab: int, prompt: int = 32, seed: int = 0) -> list[dict]:
    """One row per quantized linear of ``gm`` (graph order): layer, out_features, rel_error.
    ``gm`` runs on ``prompt`` random token ids below ``vocab`` (its caches are scratch)."""
    inputs = example_inputs(signature, 1, prompt, 2 * prompt)
    tokens = signature.index(Role.TOKENS)
    g = torch.Generator().manual_seed(seed)
    inputs[tokens] = torch.randint(0, vocab, tuple(inputs[tokens].shape), generator=g)
    probe = _Probe(gm)
    probe.run(*inputs)
    return probe.rows
