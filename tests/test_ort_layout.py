"""ort_layout.py: size-1 layout moves of a one-token graph become Reshapes, and the graph
computes the same values.

A hand-written ONNX graph in the decode pattern (q split into heads, moved to
``[B, H, 1, D]``, rotated, moved back; k's token 0 gathered) plus one Transpose that does
move data: ONNX Runtime runs it before and after the rewrite on the same inputs, at two
batch sizes (the batch axis is a named symbol, as the exporter writes it).
"""

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

H, D, CAPACITY = 3, 4, 16


def decode_like_graph():
    from onnx import TensorProto, helper

    def info(name, dims, dtype=TensorProto.FLOAT):
        return helper.make_tensor_value_info(name, dtype, dims)

    rng = np.random.default_rng(0)
    angles = rng.uniform(0, 3, (CAPACITY, D // 2)).astype(np.float32)
    inits = [helper.make_tensor(name, TensorProto.FLOAT, arr.shape, arr.ravel()) for name, arr in
             (("cos", np.cos(angles)), ("sin", np.sin(angles)))]
    inits += [helper.make_tensor("heads", TensorProto.INT64, [4], [0, 0, H, D]),
              helper.make_tensor("flat", TensorProto.INT64, [3], [0, 0, -1]),
              helper.make_tensor("zero", TensorProto.INT64, [], [0])]
    nodes = [
        helper.make_node("Reshape", ["x", "heads"], ["x4"]),
        helper.make_node("Transpose", ["x4"], ["xt"], perm=[0, 2, 1, 3]),  # moves only S = 1
        helper.make_node("RotaryEmbedding", ["xt", "cos", "sin", "pos"], ["rot"], interleaved=0),
        helper.make_node("Transpose", ["rot"], ["back"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["back", "flat"], ["q"]),
        helper.make_node("Gather", ["rot", "zero"], ["k"], axis=2),  # token 0 of a size-1 axis
        helper.make_node("Transpose", ["y"], ["moved"], perm=[0, 2, 1]),  # swaps two axes of size > 1: moves data
    ]
    value_info = [info("x4", ["b", 1, H, D]), info("xt", ["b", H, 1, D]), info("rot", ["b", H, 1, D]),
                  info("back", ["b", 1, H, D])]
    graph = helper.make_graph(
        nodes, "decode_like", [info("x", ["b", 1, H * D]), info("pos", ["b", 1], TensorProto.INT64), info("y", ["b", 2, 5])],
        [info("q", ["b", 1, H * D]), info("k", ["b", H, D]), info("moved", ["b", 5, 2])], inits, value_info=value_info)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])


def run(proto, batch):
    rng = np.random.default_rng(batch)
    feeds = {"x": rng.standard_normal((batch, 1, H * D), dtype=np.float32),
             "pos": rng.integers(0, CAPACITY, (batch, 1)).astype(np.int64),
             "y": rng.standard_normal((batch, 2, 5), dtype=np.float32)}
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def test_unit_moves_become_reshapes_and_values_stay():
    import onnx_ir as ir

    from pdcompile.backends.ort_layout import drop_unit_layout_moves

    proto = decode_like_graph()
    model = ir.serde.deserialize_model(proto)
    assert drop_unit_layout_moves(model) > 0
    after = ir.serde.serialize_model(model)
    ops = [n.op_type for n in after.graph.node]
    # the data-moving Transpose stays; the two round trips and the Gather are gone
    assert ops.count("Transpose") == 1 and "Gather" not in ops, ops
    (rot,) = [n for n in after.graph.node if n.op_type == "RotaryEmbedding"]
    assert {a.name: a.i for a in rot.attribute}.get("num_heads") == H  # the 3-D form, on x itself
    assert rot.input[0] == "x"
    for batch in (1, 3):
        for want, got in zip(run(proto, batch), run(after, batch)):
            np.testing.assert_array_equal(got, want)


def test_a_moved_non_unit_axis_or_an_unknown_shape_is_left_alone():
    import onnx_ir as ir

    from pdcompile.backends.ort_layout import drop_unit_layout_moves

    proto = decode_like_graph()
    del proto.graph.value_info[:]  # no shapes: nothing can be proved about the axes
    model = ir.serde.deserialize_model(proto)
    assert drop_unit_layout_moves(model) == 0
    assert [n.op_type for n in ir.serde.serialize_model(model).graph.node] == [n.op_type for n in proto.graph.node]
