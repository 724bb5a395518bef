"""Weight-only int8/int4 quantization of the linear layers (``OptimizeConfig.quant``).

Before::                                      After (form "quantized")::

    w = get_attr[weight]        # [N, K] fp32     q = get_attr[codes]    # uint8 [N, K/G, G*bits/8]
    y = aten.linear(x, w, b)                      s = get_attr[scales]   # [N*K/G]
                                                  z = get_attr[zeros]    # asymmetric only
                                                  y = pdcompile.weight_only_linear(x, q, s, z, b,
                                                                               bits, G, accuracy_level)

After (form "dequantized", prefill/extend/score with ``QuantConfig.prefill="dequantized"``)::

    w' = get_attr[dequantized]  # [N, K] fp32: the codes' values, so prefill and decode agree
    y = aten.linear(x, w', b)

Matches ``aten.linear`` whose weight is a 2-D floating-point constant of the graph
(``get_attr``), whatever the layer is called. The output projection is recognised by
its shape (out_features equals the vocabulary, the logits' last dimension): it gets
``QuantConfig.lm_head_bits`` (8 by default, also when the layers get 4) and is left alone
when ``QuantConfig.lm_head`` is off. Layers with fewer outputs than inputs (the MLP's
down projection, a grouped-query model's key/value projections) get
``QuantConfig.narrowing_bits`` (8 by default). Skipped on purpose: embeddings (a
gather, not a matmul), norms, biases (kept in fp32), and matmuls written as
``aten.mm``/``addmm`` on a transposed weight (GPT-2's Conv1D): none of the families
this project captures routes its projections that way.

A weight whose in_features the group size does not divide is an error that names the
layer's shape and the group sizes that would work: quantizing part of a model
silently would make its accuracy and its speed something else than asked.

Runs after the structural passes (only bf16_matmuls follows it): they match HF's graph (the lm_head
linear is what prune_final_layer slices in front of), and it changes no input of the
phase. Each phase quantizes its own copy of the weights (same codes: the function is
deterministic).
"""

from __future__ import annotations

import torch

from ..ops import dequantize_weight, quantize_weight
from .manager import GraphPass, PassResult
from .utils import constant_linears, val

NAME = "quantize_weights"
FP32_WEIGHT = "pdcompile_fp32_weight"  # node.meta key: the attribute of the weight a node quantizes

_PREFILL_LIKE = ("prefill", "extend", "score")


def _constant(gm: torch.fx.GraphModule, node: torch.fx.Node, name: str, tensor: torch.Tensor) -> torch.fx.Node:
    """A new buffer of ``gm`` and the get_attr node reading it, placed before ``node``."""
    gm.register_buffer(name, tensor)
    with gm.graph.inserting_before(node):
        attr = gm.graph.get_attr(name)
    fake = torch._guards.detect_fake_mode([n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"])
    if fake is not None:
        attr.meta["val"] = fake.from_tensor(tensor, static_shapes=True)
    return attr


def _vocab(gm: torch.fx.GraphModule) -> int | None:
    out = gm.graph.output_node().args[0]
    out = out[0] if isinstance(out, (tuple, list)) else out
    v = val(out)
    return int(v.shape[-1]) if isinstance(v, torch.Tensor) else None


def layer_bits(cfg, n_out: int, n_in: int, vocab: int | None) -> int:
    """A linear layer's bits: the lm_head's (recognised by its vocabulary-sized output), the
    narrowing layers' (fewer outputs than inputs), or the layers'."""
    if n_out == vocab:
        return cfg.lm_head_bits
    return cfg.narrowing_bits if n_out < n_in else cfg.bits


def quantize_weights(gm: torch.fx.GraphModule, ctx) -> PassResult:
    cfg = getattr(ctx, "quant", None)
    if cfg is None:
        return PassResult(gm, 0, "weights not quantized (OptimizeConfig.quant is None)")
    dequantized = cfg.prefill == "dequantized" and ctx.phase in _PREFILL_LIKE
    level = cfg.decode_accuracy_level if ctx.phase == "decode" else cfg.prefill_accuracy_level
    if ctx.device.type != "cpu":  # int8 activations are an ONNX Runtime CPU kernel form (QuantConfig)
        level = 0
    vocab = _vocab(gm)
    done: dict[str, tuple] = {}  # weight attr -> its new constants (a weight read by two linears)
    matches, head_skipped = 0, 0
    for node, x, w, weight, bias in constant_linears(gm):
        if not weight.is_floating_point():
            continue
        n_out, k = weight.shape
        if n_out == vocab and not cfg.lm_head:
            head_skipped += 1
            continue
        if k % cfg.group_size:
            fits = [g for g in (16, 32, 64, 128, 256) if k % g == 0]
            raise ValueError(
                f"group_size={cfg.group_size} does not divide in_features={k} of the linear layer with weight "
                f"[{n_out}, {k}]; group sizes that do: {fits or 'none (power of two >= 16)'}"
            )
        bits = layer_bits(cfg, n_out, k, vocab)
        base = "wq_" + w.target.replace(".", "_")
        if w.target not in done:
            q, s, z = quantize_weight(weight, bits, cfg.group_size, cfg.symmetric)
            if dequantized:
                done[w.target] = (_constant(gm, node, base + "_dequantized",
                                            dequantize_weight(q, s, z, bits, cfg.group_size)),)
            else:
                done[w.target] = (_constant(gm, node, base + "_codes", q), _constant(gm, node, base + "_scales", s),
                                  None if z is None else _constant(gm, node, base + "_zeros", z))
        consts = done[w.target]
        if dequantized:
            node.replace_input_with(w, consts[0])
            node.meta[FP32_WEIGHT] = w.target
        else:
            with gm.graph.inserting_before(node):
                new = gm.graph.call_function(
                    torch.ops.pdcompile.weight_only_linear.default,
                    (x, *consts, bias, bits, cfg.group_size, level),
                )
            new.meta = dict(node.meta)
            new.meta[FP32_WEIGHT] = w.target  # the original stays on gm: `pdcompile inspect --check` reads it
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
        matches += 1
    form = "dequantized fp32" if dequantized else f"int{cfg.bits} weight_only_linear"
    detail = (f"{matches} linear layers -> {form} (group {cfg.group_size}, "
              f"{'symmetric' if cfg.symmetric else 'asymmetric'})")
    if head_skipped:
        detail += "; lm_head kept (QuantConfig.lm_head=False)"
    elif cfg.lm_head_bits != cfg.bits:
        detail += f"; lm_head int{cfg.lm_head_bits}"
    if cfg.narrowing_bits != cfg.bits:
        detail += f"; linears with fewer outputs than inputs int{cfg.narrowing_bits}"
    return PassResult(gm, matches, detail)


PASS = GraphPass(NAME, quantize_weights, __doc__)
