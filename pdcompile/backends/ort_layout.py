"""Drop the layout round trips of a one-token ONNX graph: Transposes and Gathers that only move
or drop size-1 axes become Reshapes, and runs of Reshapes collapse.

Before (one decode layer of a Llama, as exported; S = 1)::

    q = Reshape(MatMul(x, Wq), [B, 1, H, D]) -> Transpose(0,2,1,3) -> RotaryEmbedding
        -> Transpose(0,2,1,3) -> Reshape([B, 1, H*D]) -> Attention
    k = Reshape(MatMul(x, Wk), [B, 1, Hkv, D]) -> Transpose -> RotaryEmbedding
        -> Gather(axis=2, 0) -> Reshape -> ScatterND(pool)
    out = Attention -> Reshape -> Transpose -> Reshape -> Transpose -> Reshape -> MatMul

After::

    q = RotaryEmbedding(MatMul(x, Wq), num_heads=H) -> Attention
    k = RotaryEmbedding(MatMul(x, Wk), num_heads=Hkv) -> Reshape -> ScatterND(pool)
    out = Attention -> MatMul

With one token per row, swapping the sequence axis with the head axis moves no data, so
each of those Transposes is a copy that only costs a kernel launch, and the Gather of
token 0 is a squeeze. ONNX Runtime's own optimizers keep them (its transpose optimizer
cancels only adjacent pairs). ``RotaryEmbedding`` takes the 3-D ``[B, S, H*D]`` form with
``num_heads`` (ONNX opset 23 and the com.microsoft contrib op alike), so the head split
around it goes too. Matching is by op and static shape only; anything that does not match
is left as it is. Measured on SmolLM2's paged decode graph: BENCHMARKS.md.

onnxscript's ``reshape_reshape_rule`` does the collapsing; the size-1 axis reasoning is
written here because no onnxscript rule knows that a Transpose or Gather over a unit axis
is a Reshape.
"""

from __future__ import annotations


def _static_target(dims) -> list[int] | None:
    """``dims`` as a Reshape target: known sizes, -1 for at most one unknown one (a named
    symbol: two anonymous dims cannot be told apart)."""
    unknown = [d for d in dims if not isinstance(d, int)]
    if len(unknown) > 1 or any(getattr(d, "value", None) is None for d in unknown):
        return None
    return [d if isinstance(d, int) else -1 for d in dims]


def _reshape_in_place_of(model, node, x, dims) -> bool:
    """Replace ``node`` (one output of shape ``dims``) by ``Reshape(x, dims)``."""
    import numpy as np
    import onnx_ir as ir

    target = _static_target(dims)
    if target is None:
        return False
    shape = ir.Value(name=f"{node.outputs[0].name}_unit_shape", shape=ir.Shape([len(target)]),
                     type=ir.TensorType(ir.DataType.INT64), const_value=ir.tensor(np.array(target, dtype=np.int64)))
    model.graph.register_initializer(shape)
    new = ir.Node("", "Reshape", [x, shape], num_outputs=1, name=f"{node.name}_as_reshape")
    new.outputs[0].shape, new.outputs[0].type = node.outputs[0].shape, node.outputs[0].type
    ir.convenience.replace_nodes_and_values(model.graph, node, [node], [new], node.outputs, new.outputs)
    return True


def _dims(value):
    return None if value is None or value.shape is None else list(value.shape)


def unit_axis_moves_to_reshapes(model) -> int:
    """Each Transpose whose permutation keeps the axes of size != 1 in order, and each Gather
    of a constant scalar index along an axis of size 1, becomes a Reshape. Returns the count."""
    done = 0
    for node in list(model.graph):
        if node.domain != "" or len(node.outputs) != 1:
            continue
        dims = _dims(node.inputs[0] if node.inputs else None)
        if node.op_type == "Transpose":
            perm = node.attributes.get_ints("perm", None)
            out = _dims(node.outputs[0])
            if dims is None and perm is not None and out is not None and len(out) == len(perm):
                # input shape unknown (a contrib op's output): it is the output's, permuted back
                dims = [None] * len(perm)
                for i, p in enumerate(perm):
                    dims[p] = out[i]
            if dims is None or perm is None or len(perm) != len(dims):
                continue
            moved = [p for p in perm if dims[p] != 1]
            if moved == sorted(moved):
                done += _reshape_in_place_of(model, node, node.inputs[0], [dims[p] for p in perm])
        elif node.op_type == "Gather" and len(node.inputs) == 2 and dims is not None:
            index = node.inputs[1].const_value if node.inputs[1] is not None else None
            axis = node.attributes.get_int("axis", 0) % max(len(dims), 1)
            if index is None or index.shape.rank() != 0 or dims[axis] != 1 or int(index.numpy()) not in (0, -1):
                continue
            done += _reshape_in_place_of(model, node, node.inputs[0], dims[:axis] + dims[axis + 1:])
    return done


def head_split_rotaries(model) -> int:
    """``RotaryEmbedding(Reshape(x [B, 1, H*D] -> [B, H, 1, D]))`` -> ``Reshape(RotaryEmbedding(x,
    num_heads=H))``: the 3-D form rotates the same heads at the same positions when S = 1."""
    import onnx_ir as ir

    done = 0
    for node in list(model.graph):
        if node.op_type != "RotaryEmbedding" or node.domain not in ("", "com.microsoft"):
            continue
        if node.attributes.get_int("num_heads", 0) or node.attributes.get_int("rotary_embedding_dim", 0):
            continue
        reshape = node.inputs[0].producer()
        if reshape is None or reshape.op_type != "Reshape" or reshape.domain != "":
            continue
        x, x4 = reshape.inputs[0], _dims(node.inputs[0])
        x3 = _dims(x)
        if x3 is None or x4 is None or len(x3) != 3 or len(x4) != 4 or x3[1] != 1 or x4[2] != 1:
            continue
        heads, head_dim = x4[1], x4[3]
        if not (isinstance(heads, int) and isinstance(head_dim, int) and x3[2] == heads * head_dim):
            continue
        attributes = [a for a in node.attributes.values()] + [ir.AttrInt64("num_heads", heads)]
        rot = ir.Node(node.domain, "RotaryEmbedding", [x, *node.inputs[1:]], attributes, num_outputs=1,
                      name=f"{node.name}_3d")
        rot.outputs[0].shape, rot.outputs[0].type = x.shape, x.type
        back = ir.Node("", "Reshape", [rot.outputs[0], reshape.inputs[1]], num_outputs=1, name=f"{node.name}_4d")
        back.outputs[0].shape, back.outputs[0].type = node.outputs[0].shape, node.outputs[0].type
        ir.convenience.replace_nodes_and_values(model.graph, node, [node], [rot, back], node.outputs, back.outputs)
        done += 1
    return done


def drop_identity_reshapes(model) -> int:
    """Reshapes whose output has the input's static shape (a known size in every axis but
    at most one, and that one the same symbol) are dropped."""
    done = 0
    for node in list(model.graph):
        if node.op_type != "Reshape" or node.domain != "":
            continue
        x, y = node.inputs[0], node.outputs[0]
        a, b = _dims(x), _dims(y)
        if a is None or b is None or len(a) != len(b) or _static_target(a) is None:
            continue
        if any(p != q for p, q in zip(a, b)) or y.is_graph_output():
            continue
        y.replace_all_uses_with(x)
        model.graph.remove(node, safe=True)
        done += 1
    return done


def drop_unit_layout_moves(model) -> int:
    """The three rewrites above, then onnxscript's Reshape collapsing; returns the nodes removed."""
    from onnx_ir.passes.common import RemoveUnusedNodesPass
    from onnxscript import rewriter
    from onnxscript.rewriter.rules.common import reshape_reshape_rule

    before = len(list(model.graph))
    if not unit_axis_moves_to_reshapes(model):
        return 0
    rewriter.rewrite(model, pattern_rewrite_rules=[reshape_reshape_rule])
    if head_split_rotaries(model):
        rewriter.rewrite(model, pattern_rewrite_rules=[reshape_reshape_rule])
    drop_identity_reshapes(model)
    RemoveUnusedNodesPass()(model)
    return before - len(list(model.graph))
