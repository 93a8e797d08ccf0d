"""fold_forward on hand-built GraphDefs: a batch norm or Mul/Add folded into the op AFTER it.

The reference is TensorFlow executing the original, unfolded graph.
"""

import pytest
import tensorflow as tf

import graphs

pytestmark = pytest.mark.quick  # the quick tier (scripts/test.sh --quick)

STORE_EVERY_WEIGHT = True  # conftest: run_pipeline holds every Const outside the proto

PIPELINE = {"pipeline": ["constant_folding", "fold_batch_norm", "fold_affine", "fold_forward", "cleanup"]}


def fold_and_compare(graph_def, feeds, outputs, rtol=1e-5):
    return graphs.fold_and_compare(graph_def, feeds, outputs, PIPELINE, rtol)


def forward(report):
    return next(p for p in report.passes if p.pass_name == "fold_forward")


def pooled_input(shape, data_format="NHWC"):
    """A placeholder through a max pool: no linear op before the batch norm."""
    x = tf.compat.v1.placeholder(tf.float32, shape, name="x")
    ksize = [1, 1, 2, 2] if data_format == "NCHW" else [1, 2, 2, 1]
    return tf.nn.max_pool2d(x, ksize, ksize, "VALID", data_format=data_format)


@pytest.mark.parametrize("op,data_format,padding", [
    ("Conv2D", "NHWC", "VALID"), ("Conv2D", "NCHW", "VALID"), ("Conv2D", "NHWC", "SAME_1x1"),
    ("DepthwiseConv2dNative", "NHWC", "VALID"), ("DepthwiseConv2dNative", "NCHW", "VALID")])
def test_fused_batch_norm_before_a_conv_folds_forward(op, data_format, padding):
    def build():
        shape = [None, 3, 12, 12] if data_format == "NCHW" else [None, 12, 12, 3]
        y = pooled_input(shape, data_format)
        y = graphs.fused_batch_norm(y, 3, "bn", data_format=data_format)[0]
        size = 1 if padding == "SAME_1x1" else 3
        pad = padding.split("_")[0]
        strides = [1, 1, 1, 1]
        if op == "Conv2D":
            out = tf.raw_ops.Conv2D(input=y, filter=graphs.const(graphs.random((size, size, 3, 5)), "w"),
                                    strides=strides, padding=pad, data_format=data_format, name="conv")
        else:
            out = tf.raw_ops.DepthwiseConv2dNative(
                input=y, filter=graphs.const(graphs.random((size, size, 3, 2)), "w"), strides=strides,
                padding=pad, data_format=data_format, name="conv")
        return [out.op.name]  # the conv itself is the output: its name must keep computing it

    graph_def, outputs = graphs.build(build)
    shape = (2, 3, 12, 12) if data_format == "NCHW" else (2, 12, 12, 3)
    folded, report = fold_and_compare(graph_def, {"x": graphs.random(shape)}, outputs)
    [fold] = forward(report).folds
    assert (fold.node, fold.linear_node) == ("bn", "conv")
    assert not graphs.batch_norm_nodes(folded) and report.skips == []
    assert {n.name: n.op for n in folded.node}["conv"] == "BiasAdd"


@pytest.mark.parametrize("transpose_b", [False, True])
def test_mul_add_before_a_matmul_folds_forward_into_its_bias(transpose_b):
    """Keras 3's batch norm form on a Dense input: x * s + t -> MatMul -> BiasAdd."""
    def build():
        x = tf.compat.v1.placeholder(tf.float32, [None, 6], name="x")
        y = tf.nn.relu(x) * graphs.const(graphs.random((6,)), "s") + graphs.const(graphs.random((6,)), "t")
        w = graphs.random((4, 6) if transpose_b else (6, 4))
        y = tf.matmul(y, graphs.const(w, "w"), transpose_b=transpose_b, name="linear")
        return [tf.nn.bias_add(y, graphs.const(graphs.random((4,)), "b"), name="out").op.name]

    graph_def, outputs = graphs.build(build)
    folded, report = fold_and_compare(graph_def, {"x": graphs.random((3, 6))}, outputs)
    assert len(forward(report).folds) == 1 and report.skips == []
    ops = graphs.op_counts(folded)
    assert "Mul" not in ops and "AddV2" not in ops and ops["BiasAdd"] == 1  # merged into the existing bias


def _batch_matmul_after_affine(kernel_shape, adj_x=False, shift=True):
    """relu(x) * s (+ t) -> BatchMatMulV2(., W) -> out, x of shape [3, 5, 6]."""
    def build():
        x = tf.compat.v1.placeholder(tf.float32, [3, 5, 6], name="x")
        y = tf.nn.relu(x)
        if adj_x:
            y = tf.transpose(y, [0, 2, 1])  # [3, 6, 5]: adj_x reads it back as [3, 5, 6]
            channels = 5
        else:
            channels = 6
        y = y * graphs.const(graphs.random((channels,)), "s")
        if shift:
            y = y + graphs.const(graphs.random((channels,)), "t")
        w = graphs.const(graphs.random(kernel_shape), "w")
        return [tf.raw_ops.BatchMatMulV2(x=y, y=w, adj_x=adj_x, name="bmm").op.name]
    graph_def, outputs = graphs.build(build)
    return fold_and_compare(graph_def, {"x": graphs.random((3, 5, 6))}, outputs)


def test_an_affine_map_before_a_batch_matmul_folds_forward_where_it_is_exact():
    folded, report = _batch_matmul_after_affine((6, 4))
    [fold] = forward(report).folds
    assert fold.linear_node == "bmm" and report.skips == []
    assert "Mul" not in graphs.op_counts(folded)
    # A batched kernel: the scale folds into each batch's kernel, a shift would add each its own bias.
    folded, report = _batch_matmul_after_affine((3, 6, 4), shift=False)
    assert len(forward(report).folds) == 1 and "Mul" not in graphs.op_counts(folded)
    folded, report = _batch_matmul_after_affine((3, 6, 4))
    assert forward(report).folds == [] and "its own kernel" in forward(report).skips[0].reason
    # adj_x: the channels the affine map scales are not the ones the kernel sums over.
    folded, report = _batch_matmul_after_affine((6, 4), adj_x=True)
    assert forward(report).folds == [] and "Mul" in graphs.op_counts(folded)


def test_a_shift_before_a_padded_conv_is_left_alone_but_a_pure_scale_folds():
    """SAME padding of a 3x3 kernel pads zeros: x * s commutes with that, x * s + t does not."""
    def build():
        y = pooled_input([None, 12, 12, 3])
        shifted = graphs.fused_batch_norm(y, 3, "bn")[0]
        a = tf.nn.conv2d(shifted, graphs.const(graphs.random((3, 3, 3, 4)), "w1"), 1, "SAME", name="conv1")
        scaled = tf.nn.relu(y) * graphs.const(graphs.random((3,)), "s")
        b = tf.nn.conv2d(scaled, graphs.const(graphs.random((3, 3, 3, 4)), "w2"), 1, "SAME", name="conv2")
        return [tf.identity(a, name="out1").op.name, tf.identity(b, name="out2").op.name]

    graph_def, outputs = graphs.build(build)
    folded, report = fold_and_compare(graph_def, {"x": graphs.random((2, 12, 12, 3))}, outputs)
    assert [f.linear_node for f in forward(report).folds] == ["conv2"]
    [skip] = forward(report).skips
    assert skip.node == "bn" and "pads with zeros" in skip.reason
    assert graphs.batch_norm_nodes(folded) == ["bn"]


def test_a_batch_norm_with_another_consumer_is_left_alone():
    def build():
        y = pooled_input([None, 12, 12, 3])
        bn = graphs.fused_batch_norm(y, 3, "bn")[0]
        conv = tf.nn.conv2d(bn, graphs.const(graphs.random((3, 3, 3, 4)), "w"), 1, "VALID", name="conv")
        return [tf.identity(conv, name="out").op.name, tf.identity(tf.nn.relu(bn), name="side").op.name]

    graph_def, outputs = graphs.build(build)
    folded, report = fold_and_compare(graph_def, {"x": graphs.random((2, 12, 12, 3))}, outputs)
    assert forward(report).folds == []
    assert any("2 consumers" in s.reason for s in forward(report).skips)


def test_backward_folds_first_and_forward_does_not_move_a_bias():
    """conv1 -> BN -> conv2 (VALID): the batch norm folds into conv1; conv1's bias stays with it."""
    def build():
        x = tf.compat.v1.placeholder(tf.float32, [None, 10, 10, 3], name="x")
        y = tf.nn.conv2d(x, graphs.const(graphs.random((3, 3, 3, 4)), "w1"), 1, "SAME", name="conv1")
        y = graphs.fused_batch_norm(y, 4, "bn")[0]
        return [tf.nn.conv2d(y, graphs.const(graphs.random((3, 3, 4, 5)), "w2"), 1, "VALID", name="conv2").op.name]

    graph_def, outputs = graphs.build(build)
    folded, report = fold_and_compare(graph_def, {"x": graphs.random((2, 10, 10, 3))}, outputs)
    assert [f.linear_node for f in report.folds] == ["conv1"] and forward(report).folds == []


@pytest.mark.parametrize("pad_width", [0, 1])
def test_a_pad_of_zero_width_is_passed_but_a_real_pad_stops_the_fold(pad_width):
    def build():
        y = pooled_input([None, 12, 12, 3])
        y = graphs.fused_batch_norm(y, 3, "bn")[0]
        y = tf.pad(y, [[0, 0], [pad_width, pad_width], [pad_width, pad_width], [0, 0]], name="pad")
        y = tf.nn.conv2d(y, graphs.const(graphs.random((3, 3, 3, 4)), "w"), 1, "VALID", name="conv")
        return [tf.identity(y, name="out").op.name]

    graph_def, outputs = graphs.build(build)
    folded, report = fold_and_compare(graph_def, {"x": graphs.random((2, 12, 12, 3))}, outputs)
    assert len(forward(report).folds) == (1 if pad_width == 0 else 0)
    assert bool(graphs.batch_norm_nodes(folded)) == (pad_width != 0)
