"""Lower one decoder layer, repeat it: the whole model's ONNX graph from a four-layer one.

Before (``ctx.layers``: the phase was captured with decoder layers 0, 1, 2 and N-1 of N,
see capture.repeated_layers)::

    prologue -> layer 0 -> layer 1 -> layer 2 -> layer N-1 -> head      (inputs pool_0..pool_7)

After::

    prologue -> layer 0 -> layer 1 -> layer 2 -> layer 3 ... layer N-2 -> layer N-1 -> head

Layers 3..N-2 are copies of the lowered layer 2, node for node, each reading its own
weights (the model's tensors, no copy) and its own KV inputs; capture, the passes, the
ONNX translation and onnxscript's optimizer see four layers whatever N is.

Which layer a node belongs to is read from the data flow, not from names: a node's layer
is the highest layer among the weights and KV inputs it depends on (the prologue's depend
on none). So a fusion across the boundary (the residual add of one layer and the norm of
the next, SkipSimplifiedLayerNormalization) lands in the later layer, the same way for
every layer. The copy is made only when layer 2 is layer 1 lowered again: the same ops
with the same attributes in the same order, each input the counterpart of layer 1's (its
own weight, its own cache, what the layer before produced, or the same shared value).
Anything else (a weight-derived constant folded into a new initializer, a node with
subgraphs, a layer reading two layers back) raises :class:`RepeatError`, and optimize()
lowers every layer instead.

Written by hand: onnx_ir has the graph editing (nodes, values, topological sort) but no
notion of repeating a region; ONNX local functions would repeat it too, but ONNX Runtime
inlines them when it builds the session, after the optimizer has run on the caller's side.
"""

from __future__ import annotations

import re

import torch

from ..phase import STATE_ROLES, RepeatedLayers


class RepeatError(ValueError):
    """The lowered layers do not repeat (the message says where they differ)."""


def _made_by(value) -> str:
    node = value.producer() if value is not None else None
    return f"{node.op_type}({', '.join(str(getattr(v, 'name', None)) for v in node.inputs)})" if node else "-"


def _same(a, b, depth: int = 0) -> bool:
    """Whether two values that depend on no layer are the same: one value, equal constants,
    or the same op with the same attributes over the same values (a computation the
    optimizer left once per layer)."""
    if a is b:
        return True
    if a is None or b is None or depth > 8:
        return False
    if a.const_value is not None and b.const_value is not None:
        ca, cb = a.const_value, b.const_value
        return ca.dtype == cb.dtype and tuple(ca.shape) == tuple(cb.shape) and ca.tobytes() == cb.tobytes()
    na, nb = a.producer(), b.producer()
    if na is None or nb is None or a.index() != b.index():
        return False
    return ((na.domain, na.op_type, len(na.inputs)) == (nb.domain, nb.op_type, len(nb.inputs)) and
            _attrs(na) == _attrs(nb) and all(_same(x, y, depth + 1) for x, y in zip(na.inputs, nb.inputs)))


def _attrs(node) -> dict:
    return {k: repr(a.value) for k, a in node.attributes.items()}


def repeat_layers(model, plan: RepeatedLayers, small_signature) -> None:
    """Rewrite ``model`` (an onnx_ir Model of the four-layer graph, inputs in
    ``small_signature``'s order, outputs ``logits, present_0, ...``) in place into the
    whole model's graph (inputs in ``plan.signature``'s order)."""
    import onnx_ir as ir
    from torch.onnx._internal.exporter._core import TorchTensor

    graph = model.graph
    n, last = plan.num_layers, len(plan.kept) - 1  # last: layer N-1's position in the small graph
    weight = re.compile(plan.weight_pattern)

    # ---- the layer of every KV input, weight and node (-1: shared)
    inputs = list(graph.inputs)
    state = [i for i, s in enumerate(small_signature.inputs) if s.role in STATE_ROLES]
    per_layer = len(state) // len(plan.kept)
    layer_of, slot_of = {}, {}
    for k, i in enumerate(state):
        layer_of[inputs[i]], slot_of[inputs[i]] = divmod(k, per_layer)
    weight_of = {}  # value -> (layer, name inside the layer)
    for name, value in graph.initializers.items():
        if m := weight.match(name):
            weight_of[value] = (int(m.group(1)), m.group(2))
            layer_of[value] = int(m.group(1))
    nodes = list(graph)
    node_layer = {}
    for node in nodes:
        if any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values()):
            raise RepeatError(f"node {node.name} ({node.op_type}) has subgraphs")
        node_layer[node] = max((layer_of.get(v, -1) for v in node.inputs if v is not None), default=-1)
        for out in node.outputs:
            layer_of[out] = node_layer[node]
    one, two = ([nd for nd in nodes if node_layer[nd] == k] for k in (1, 2))
    tail = [nd for nd in nodes if node_layer[nd] == last]

    # ---- layer 2 must be layer 1 again
    if len(one) != len(two):
        raise RepeatError(f"layers 1 and 2 lowered to {len(one)} and {len(two)} nodes")
    iso = {}  # layer-1 value -> layer-2 value
    for a, b in zip(one, two):
        if (a.domain, a.op_type, len(a.inputs), len(a.outputs)) != (b.domain, b.op_type, len(b.inputs), len(b.outputs)) \
                or _attrs(a) != _attrs(b):
            raise RepeatError(f"layers 1 and 2 differ at {a.name} / {b.name} ({a.op_type} / {b.op_type})")
        iso.update(zip(a.outputs, b.outputs))
    for a, b in zip(one, two):
        for va, vb in zip(a.inputs, b.inputs):
            if va is None or vb is None:
                ok = va is vb
            else:
                pair = (layer_of.get(va, -1), layer_of.get(vb, -1))
                ok = (pair == (-1, -1) and _same(va, vb)  # shared: positions, masks, rotary tables, constants
                      or pair == (1, 2) and iso.get(va) is vb  # made inside the layer
                      or pair == (0, 1) and vb.producer() is not None and va.producer() is not None  # the layer before's
                      or vb in weight_of and weight_of.get(va) == (1, weight_of[vb][1]) and weight_of[vb][0] == 2
                      or pair == (1, 2) and va in slot_of and slot_of[va] == slot_of.get(vb))  # its own KV input
            if not ok:
                raise RepeatError(f"input {getattr(vb, 'name', None)} of {b.name} ({b.op_type}) is not layer 1's "
                                  f"{getattr(va, 'name', None)} again (layers {layer_of.get(vb, -1)} / "
                                  f"{layer_of.get(va, -1)}; made by {_made_by(vb)} / {_made_by(va)})")
    for nd in tail:
        for v in nd.inputs:
            if v is not None and layer_of.get(v, -1) in (0, 1) or v in weight_of and weight_of[v][0] == 2:
                raise RepeatError(f"the last layer reads {v.name}, which is not the layer before's output")

    # ---- the last layer's weights and KV inputs take their real numbers
    for value, (layer, inner) in list(weight_of.items()):
        if layer == last:
            graph.initializers.pop(value.name)
            value.name = f"model.{plan.path}.{n - 1}.{inner}"
            graph.register_initializer(value)
    real = lambda layer: layer if layer < last else n - 1  # noqa: E731 - a small graph's layer, in the model
    kv = {(real(layer_of[v]), slot_of[v]): v for v in slot_of}  # (layer, slot) -> graph input
    for layer in range(3, n - 1):
        for v in slot_of:
            if layer_of[v] == 2:
                kv[(layer, slot_of[v])] = ir.Value(name=f"{v.name}@{layer}", shape=v.shape, type=v.type)

    def own_weight(layer: int, like):
        inner = weight_of[like][1]
        name = f"model.{plan.path}.{layer}.{inner}"
        tensor = plan.params.get(f"{plan.path}.{layer}.{inner}")
        if tensor is None or tuple(tensor.shape) != tuple(like.shape) or TorchTensor(tensor).dtype != like.dtype:
            raise RepeatError(f"the model has no {plan.path}.{layer}.{inner} shaped like layer 2's")
        if name not in graph.initializers:
            graph.register_initializer(ir.Value(name=name, shape=like.shape, type=like.type,
                                                const_value=TorchTensor(tensor.detach(), name)))
        return graph.initializers[name]

    # ---- the copies: layers 3 .. N-2 from layer 2
    before = {v: v for nd in two for v in nd.outputs}  # layer-2 value -> its counterpart in the layer before
    presents = {}  # (layer, layer-2 output) -> the copy's value
    for layer in range(3, n - 1):
        mine = {}
        for nd in two:
            args = []
            for v in nd.inputs:
                ell = -1 if v is None else layer_of.get(v, -1)
                if ell == -1:
                    args.append(v)
                elif v in mine:
                    args.append(mine[v])
                elif v in weight_of:
                    args.append(own_weight(layer, v))
                elif v in slot_of:
                    args.append(kv[(layer, slot_of[v])])
                else:  # what layer 1 made: here, the layer before's counterpart
                    args.append(before[iso[v]])
            copy = ir.Node(nd.domain, nd.op_type, args, [ir.Attr(a.name, a.type, a.value) for a in nd.attributes.values()],
                           num_outputs=len(nd.outputs), name=f"{nd.name}@{layer}", version=nd.version)
            for o, c in zip(nd.outputs, copy.outputs):
                c.name, c.shape, c.type = f"{o.name}@{layer}", o.shape, o.type
                mine[o] = c
                presents[(layer, o)] = c
            graph.append(copy)
        before = mine
    for nd in tail:  # the last layer reads what the last copy made
        for i, v in enumerate(nd.inputs):
            if v is not None and layer_of.get(v, -1) == 2:
                nd.replace_input_with(i, before[v])

    # ---- inputs and outputs in the whole model's order
    plain = [v for i, v in enumerate(inputs) if i not in set(state)]
    full = plan.signature
    graph.inputs.clear()
    graph.inputs.extend(plain + [kv[key] for key in sorted(kv)])
    for v, spec in zip(graph.inputs, full.inputs):
        v.name = spec.name
    logits, *small_presents = list(graph.outputs)
    out = {}
    for k, v in enumerate(small_presents):
        layer, slot = divmod(k, per_layer)
        out[(real(layer), slot)] = v
        if layer == 2:
            for j in range(3, n - 1):
                out[(j, slot)] = presents[(j, v)]
    graph.outputs.clear()
    graph.outputs.extend([logits] + [out[key] for key in sorted(out)])
    for i, v in enumerate(graph.outputs[1:]):
        v.name = f"present_{i}"
    graph.sort()
    states = sum(s.role in STATE_ROLES for s in full.inputs)
    if (len(graph.inputs), len(graph.outputs)) != (len(full.inputs), 1 + states):
        raise RepeatError(f"the repeated graph has {len(graph.inputs)} inputs and {len(graph.outputs)} outputs, "
                          f"the model's signature {len(full.inputs)} inputs and {1 + states} outputs")
