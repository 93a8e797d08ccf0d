"""The patterns the chain grammar's tables add, each with its must-not-fold twin.

Hand-built GraphDefs; the reference is always TensorFlow running the original, unfolded
graph (graphs.fold_and_compare).
"""

import numpy as np
import pytest
import tensorflow as tf

import graphs

pytestmark = pytest.mark.quick  # the quick tier (scripts/test.sh --quick)

STORE_EVERY_WEIGHT = True  # conftest: run_pipeline holds every Const outside the proto

PIPELINE = {"pipeline": ["fold_batch_norm", "fold_affine", "fold_forward", "lower_batch_norm", "cleanup"]}
NO_LOWERING = {"pipeline": ["fold_batch_norm", "fold_affine", "fold_forward", "cleanup"]}


def fold_and_compare(graph_def, feeds, outputs=("out",), rtol=1e-5, pipeline=PIPELINE):
    return graphs.fold_and_compare(graph_def, feeds, list(outputs), pipeline, rtol)


def pass_report(report, name):
    return next(p for p in report.passes if p.pass_name == name)


def placeholder(shape, name="x", dtype=tf.float32):
    return tf.compat.v1.placeholder(dtype, shape, name=name)


def conv(x, cin, cout, padding="SAME", name="conv", kernel=None, dtype=np.float32):
    kernel = graphs.random((3, 3, cin, cout)).astype(dtype) if kernel is None else kernel
    return tf.raw_ops.Conv2D(input=x, filter=graphs.const(kernel, name + "_w"), strides=[1, 1, 1, 1],
                             padding=padding, name=name)


def channel_const(values, name):
    return graphs.const(np.asarray(values, np.float32), name)


def ops_of(graph_def):
    return graphs.op_counts(graph_def)


# --- BatchNormWithGlobalNormalization (pre-2017 frozen models) --------------------------------

def global_normalization_graph(linear, scale_after_normalization, second_consumer=False):
    """linear op -> BatchNormWithGlobalNormalization -> out, in a GraphDef of producer version 8
    (the op was removed from version 9 on; TF still runs such graphs)."""
    def build():
        x = placeholder([None, 6, 6, 3])
        if linear == "Conv2D":
            y = conv(x, 3, 4)
        else:
            y = tf.raw_ops.DepthwiseConv2dNative(input=x, filter=graphs.const(graphs.random((3, 3, 3, 2)), "w"),
                                                 strides=[1, 1, 1, 1], padding="SAME", name="conv")
        channels = 4 if linear == "Conv2D" else 6
        gamma, beta, mean, variance = graphs.bn_params(channels)
        for name, value in zip("mvbg", (mean, variance, beta, gamma)):
            graphs.const(value, "bn_" + name)
        stand_in = tf.identity(y, name="bn")  # replaced by the old op below
        tf.identity(stand_in, name="out")
        if second_consumer:
            tf.nn.relu(y, name="side")
    graph_def, _ = graphs.build(build)
    node = next(n for n in graph_def.node if n.name == "bn")
    node.op = "BatchNormWithGlobalNormalization"
    del node.input[:]
    node.input.extend(["conv", "bn_m", "bn_v", "bn_b", "bn_g"])
    node.attr["variance_epsilon"].f = 1e-3
    node.attr["scale_after_normalization"].b = scale_after_normalization
    graph_def.versions.producer = 8
    return graph_def


@pytest.mark.parametrize("linear", ["Conv2D", "DepthwiseConv2dNative"])
@pytest.mark.parametrize("scale_after_normalization", [True, False])
def test_batch_norm_with_global_normalization_folds(linear, scale_after_normalization):
    graph_def = global_normalization_graph(linear, scale_after_normalization)
    folded, report = fold_and_compare(graph_def, {"x": graphs.random((2, 6, 6, 3))})
    [fold] = report.folds
    assert fold.op == "BatchNormWithGlobalNormalization" and fold.linear_op == linear
    assert "BatchNormWithGlobalNormalization" not in ops_of(folded)


def test_batch_norm_with_global_normalization_after_a_shared_conv_is_left():
    graph_def = global_normalization_graph("Conv2D", True, second_consumer=True)
    outputs = ["out", "side"]
    folded, report = fold_and_compare(graph_def, {"x": graphs.random((2, 6, 6, 3))}, outputs,
                                      pipeline=NO_LOWERING)
    assert report.folds == [] and "conv has 2 consumers" in report.skips[0].reason
    assert "BatchNormWithGlobalNormalization" in ops_of(folded)


# --- pools, Transpose and Cast as pass-throughs ----------------------------------------------

def pool(y, kind, padding="SAME"):
    op = tf.nn.avg_pool2d if kind == "AvgPool" else tf.nn.max_pool2d
    return op(y, 3, 2, padding, name="pool")


@pytest.mark.parametrize("kind", ["AvgPool", "MaxPool"])
def test_per_channel_affine_after_a_pool_folds_into_the_conv_before_it(kind):
    def build():
        y = pool(conv(placeholder([None, 7, 7, 3]), 3, 4), kind)  # SAME: edge cells average fewer inputs
        y = tf.multiply(y, channel_const([0.5, 2.0, 1.5, 0.25], "scale"), name="scaled")
        tf.add(y, channel_const([0.1, -0.2, 0.3, 0.0], "shift"), name="out")
    graph_def, _ = graphs.build(build)
    folded, report = fold_and_compare(graph_def, {"x": graphs.random((2, 7, 7, 3))})
    [fold] = pass_report(report, "fold_affine").folds
    assert fold.linear_node == "conv"
    ops = ops_of(folded)
    assert ops[kind] == 1 and "Mul" not in ops and ops.get("BiasAdd") == 1


def test_a_negative_scale_does_not_pass_a_max_pool():
    def build():
        y = pool(conv(placeholder([None, 7, 7, 3]), 3, 4), "MaxPool")
        tf.multiply(y, channel_const([0.5, -2.0, 1.5, 0.25], "scale"), name="out")
    graph_def, _ = graphs.build(build)
    folded, report = fold_and_compare(graph_def, {"x": graphs.random((2, 7, 7, 3))})
    assert report.folds == []
    [skip] = report.skips
    assert skip.node == "out" and "positive scale" in skip.reason
    assert ops_of(folded)["Mul"] == 1


def test_a_pool_with_a_second_consumer_stops_the_chain():
    def build():
        y = pool(conv(placeholder([None, 7, 7, 3]), 3, 4), "AvgPool")
        tf.multiply(y, channel_const([0.5, 2.0, 1.5, 0.25], "scale"), name="out")
        tf.nn.relu(y, name="side")
    graph_def, _ = graphs.build(build)
    _, report = fold_and_compare(graph_def, {"x": graphs.random((2, 7, 7, 3))}, ["out", "side"])
    assert report.folds == [] and "pool has 2 consumers" in report.skips[0].reason


@pytest.mark.parametrize("kind,scale", [("MaxPool", [0.5, 2.0, 1.5]), ("AvgPool", [0.5, -2.0, 1.5])])
def test_affine_before_a_pool_folds_forward_into_the_valid_conv_after_it(kind, scale):
    def build():
        x = tf.nn.relu(placeholder([None, 8, 8, 3]))
        y = tf.add(tf.multiply(x, channel_const(scale, "scale")), channel_const([0.1, 0.2, -0.3], "shift"))
        tf.identity(conv(pool(y, kind, "VALID"), 3, 4, padding="VALID"), name="out")
    graph_def, _ = graphs.build(build)
    folded, report = fold_and_compare(graph_def, {"x": graphs.random((2, 8, 8, 3))})
    [fold] = pass_report(report, "fold_forward").folds
    assert fold.linear_node == "conv" and "Mul" not in ops_of(folded)


def test_a_negative_scale_before_a_max_pool_does_not_fold_forward():
    def build():
        x = tf.nn.relu(placeholder([None, 8, 8, 3]))
        y = tf.multiply(x, channel_const([0.5, -2.0, 1.5], "scale"), name="scaled")
        tf.identity(conv(pool(y, "MaxPool", "VALID"), 3, 4, padding="VALID"), name="out")
    graph_def, _ = graphs.build(build)
    folded, report = fold_and_compare(graph_def, {"x": graphs.random((2, 8, 8, 3))})
    assert pass_report(report, "fold_forward").folds == []
    assert any(s.node == "scaled" and "positive scale" in s.reason for s in report.skips)


def test_batch_norm_after_a_transpose_to_nchw_folds_into_the_nhwc_conv():
    def build():
        y = tf.transpose(conv(placeholder([None, 6, 6, 3]), 3, 4), [0, 3, 1, 2], name="to_nchw")
        bn = graphs.fused_batch_norm(y, 4, "bn", data_format="NCHW")[0]
        tf.identity(tf.transpose(bn, [0, 2, 3, 1]), name="out")
    graph_def, _ = graphs.build(build)
    folded, report = fold_and_compare(graph_def, {"x": graphs.random((2, 6, 6, 3))})
    [fold] = report.folds
    assert fold.node == "bn" and fold.linear_node == "conv"
    nodes = {n.name: n for n in folded.node}
    # The new bias is on the conv's NHWC output, before the Transpose.
    assert nodes[nodes["to_nchw"].input[0]].op == "BiasAdd"


def test_scalar_mul_through_a_transpose_folds_forward():
    def build():
        x = placeholder([None, 3, 8, 8])  # NCHW input, transposed for an NHWC conv
        y = tf.transpose(tf.multiply(x, graphs.const(np.float32(1 / 255), "scale")), [0, 2, 3, 1], name="to_nhwc")
        tf.identity(conv(y, 3, 4, padding="VALID"), name="out")
    graph_def, _ = graphs.build(build)
    folded, report = fold_and_compare(graph_def, {"x": graphs.random((2, 3, 8, 8)) * 255})
    [fold] = pass_report(report, "fold_forward").folds
    assert fold.linear_node == "conv" and "Mul" not in ops_of(folded)
    assert {n.name: n for n in folded.node}["to_nhwc"].input[0] == "x"


def test_a_transpose_with_a_second_consumer_is_not_passed():
    def build():
        x = placeholder([None, 3, 8, 8])
        t = tf.transpose(tf.multiply(x, channel_const([[[2.0]], [[3.0]], [[4.0]]], "scale")), [0, 2, 3, 1])
        tf.identity(conv(t, 3, 4, padding="VALID"), name="out")
        tf.identity(t, name="side")
    graph_def, _ = graphs.build(build)
    folded, report = fold_and_compare(graph_def, {"x": graphs.random((2, 3, 8, 8))}, ["out", "side"])
    assert report.folds == [] and ops_of(folded)["Mul"] == 1


def test_uint8_image_normalization_folds_forward():
    """Cast(uint8 -> float32) * (1/255) - mean -> VALID conv: the Cast stays, the rest folds."""
    def build():
        image = tf.cast(placeholder([None, 8, 8, 3], dtype=tf.uint8), tf.float32, name="as_float")
        y = tf.subtract(tf.multiply(image, graphs.const(np.float32(1 / 255), "scale")),
                        channel_const([0.485, 0.456, 0.406], "mean"))
        tf.identity(conv(y, 3, 4, padding="VALID"), name="out")
    graph_def, _ = graphs.build(build)
    feeds = {"x": graphs.RNG.integers(0, 256, (2, 8, 8, 3)).astype(np.uint8)}
    folded, report = fold_and_compare(graph_def, feeds)
    [fold] = pass_report(report, "fold_forward").folds
    ops = ops_of(folded)
    assert "Mul" not in ops and "Sub" not in ops and ops["Cast"] == 1


def test_float32_scale_through_a_cast_to_float16_folds_forward():
    def build():
        y = tf.multiply(tf.nn.relu(placeholder([None, 8, 8, 3])), channel_const([0.5, 2.0, 1.5], "scale"))
        tf.identity(conv(tf.cast(y, tf.float16), 3, 4, padding="VALID", dtype=np.float16), name="out")
    graph_def, _ = graphs.build(build)
    folded, report = fold_and_compare(graph_def, {"x": graphs.random((2, 8, 8, 3))}, rtol=1e-2)
    assert len(pass_report(report, "fold_forward").folds) == 1 and "Mul" not in ops_of(folded)


# --- more forward folds ----------------------------------------------------------------------

def test_mul_add_before_a_valid_conv3d_folds_forward():
    def build():
        y = tf.add(tf.multiply(tf.nn.relu(placeholder([None, 4, 6, 6, 3])), channel_const([0.5, 2.0, 1.5], "s")),
                   channel_const([0.1, -0.2, 0.3], "t"))
        tf.raw_ops.Conv3D(input=y, filter=graphs.const(graphs.random((2, 3, 3, 3, 4)), "w"), strides=[1] * 5,
                          padding="VALID", name="out")
    graph_def, _ = graphs.build(build)
    folded, report = fold_and_compare(graph_def, {"x": graphs.random((2, 4, 6, 6, 3))})
    [fold] = pass_report(report, "fold_forward").folds
    assert fold.linear_op == "Conv3D" and "Mul" not in ops_of(folded) and "AddV2" not in ops_of(folded)


def transposed_conv_graph(with_shift):
    def build():
        y = tf.multiply(tf.nn.relu(placeholder([2, 4, 4, 3])), channel_const([0.5, 2.0, 1.5], "s"), name="scaled")
        if with_shift:
            y = tf.add(y, channel_const([0.1, -0.2, 0.3], "t"))
        tf.raw_ops.Conv2DBackpropInput(input_sizes=[2, 8, 8, 5], filter=graphs.const(graphs.random((3, 3, 5, 3)), "w"),
                                       out_backprop=y, strides=[1, 2, 2, 1], padding="SAME", name="out")
    return graphs.build(build)[0]


def test_a_scale_before_a_transposed_conv_folds_forward():
    folded, report = fold_and_compare(transposed_conv_graph(False), {"x": graphs.random((2, 4, 4, 3))})
    [fold] = pass_report(report, "fold_forward").folds
    assert fold.linear_op == "Conv2DBackpropInput" and "Mul" not in ops_of(folded)


def test_a_shift_before_a_strided_transposed_conv_is_left_with_the_reason():
    folded, report = fold_and_compare(transposed_conv_graph(True), {"x": graphs.random((2, 4, 4, 3))})
    assert pass_report(report, "fold_forward").folds == []
    assert any("different number of kernel cells" in s.reason for s in pass_report(report, "fold_forward").skips)


@pytest.mark.parametrize("linear", ["Conv2D", "DepthwiseConv2dNative", "MatMul"])
@pytest.mark.parametrize("op", ["AddV2", "Sub"])
def test_an_add_or_sub_alone_folds_forward_into_a_valid_linear_op(linear, op):
    def build():
        shape = [None, 3] if linear == "MatMul" else [None, 6, 6, 3]
        y = getattr(tf.raw_ops, op)(x=tf.nn.relu(placeholder(shape)), y=channel_const([0.1, -0.2, 0.3], "t"),
                                    name="shifted")
        if linear == "MatMul":
            tf.matmul(y, graphs.const(graphs.random((3, 4)), "w"), name="out")
        elif linear == "Conv2D":
            conv(y, 3, 4, padding="VALID", name="out")
        else:
            tf.raw_ops.DepthwiseConv2dNative(input=y, filter=graphs.const(graphs.random((3, 3, 3, 2)), "w"),
                                             strides=[1, 1, 1, 1], padding="VALID", name="out")
    graph_def, _ = graphs.build(build)
    feeds = {"x": graphs.random((2, 3) if linear == "MatMul" else (2, 6, 6, 3))}
    folded, report = fold_and_compare(graph_def, feeds)
    [fold] = pass_report(report, "fold_forward").folds
    assert fold.node == "shifted" and op not in ops_of(folded)
    assert {n.name: n for n in folded.node}["out"].op == "BiasAdd"  # the output keeps its name


def test_an_add_alone_before_a_same_conv_is_left_with_the_reason():
    def build():
        y = tf.add(tf.nn.relu(placeholder([None, 6, 6, 3])), channel_const([0.1, -0.2, 0.3], "t"), name="shifted")
        conv(y, 3, 4, padding="SAME", name="out")
    graph_def, _ = graphs.build(build)
    folded, report = fold_and_compare(graph_def, {"x": graphs.random((2, 6, 6, 3))})
    assert report.folds == []
    [skip] = pass_report(report, "fold_forward").skips
    assert skip.node == "shifted" and "pads with zeros" in skip.reason


def test_the_bias_of_a_linear_op_is_not_moved_into_the_next_one():
    def build():
        y = tf.nn.bias_add(conv(placeholder([None, 6, 6, 3]), 3, 4, name="first"), channel_const([1, 2, 3, 4], "b"))
        conv(y, 4, 2, padding="VALID", name="out")
    graph_def, _ = graphs.build(build)
    folded, report = fold_and_compare(graph_def, {"x": graphs.random((2, 6, 6, 3))})
    assert report.folds == [] and report.skips == []


def test_float16_forward_fold_that_would_overflow_is_left_with_the_reason():
    """x * 3000 before a float16 conv whose kernel reaches 60: the folded kernel would pass 65504."""
    def build():
        y = tf.multiply(tf.nn.relu(placeholder([None, 6, 6, 3], dtype=tf.float16)),
                        graphs.const(np.array([3000.0, 2000.0, 2500.0], np.float16), "scale"), name="scaled")
        kernel = (graphs.random((3, 3, 3, 4)) * 30).astype(np.float16)
        tf.identity(conv(y, 3, 4, padding="VALID", kernel=kernel), name="out")
    graph_def, _ = graphs.build(build)
    feeds = {"x": (graphs.random((2, 6, 6, 3)) * 0.0003).astype(np.float16)}
    folded, report = fold_and_compare(graph_def, feeds, rtol=1e-2)
    assert report.folds == []
    [skip] = pass_report(report, "fold_forward").skips
    assert skip.node == "scaled" and "overflow float16" in skip.reason
    assert np.all(np.isfinite(graphs.run(folded, feeds, ["out"])[0]))


# --- biases and non-constant kernels ---------------------------------------------------------

def weights_as_input_graph(then):
    def build():
        x, w = placeholder([None, 6, 6, 3]), placeholder([3, 3, 3, 4], name="w")
        y = tf.nn.bias_add(tf.nn.conv2d(x, w, 1, "SAME", name="conv"), channel_const([1, 2, 3, 4], "b"))
        getattr(tf, then)(y, channel_const([0.5, 0.25, -1.0, 2.0], "c"), name="out")
    return graphs.build(build)[0]


def test_two_biases_merge_whatever_the_kernel():
    graph_def = weights_as_input_graph("add")
    feeds = {"x": graphs.random((2, 6, 6, 3)), "w": graphs.random((3, 3, 3, 4))}
    folded, report = fold_and_compare(graph_def, feeds)
    [fold] = report.folds
    assert fold.linear_node == "conv"
    ops = ops_of(folded)
    assert ops.get("BiasAdd") == 1 and "AddV2" not in ops


def test_a_scale_on_a_non_constant_kernel_is_left_with_the_reason():
    graph_def = weights_as_input_graph("multiply")
    feeds = {"x": graphs.random((2, 6, 6, 3)), "w": graphs.random((3, 3, 3, 4))}
    folded, report = fold_and_compare(graph_def, feeds)
    assert report.folds == []
    [skip] = report.skips
    assert skip.node == "out" and "kernel w of conv is not constant" in skip.reason


# --- lowering what does not fold -------------------------------------------------------------

def compute_ops(graph_def):
    """Ops on the data path: what runs, not constants and plumbing."""
    return sum(count for op, count in ops_of(graph_def).items() if op not in ("Const", "Identity", "Placeholder"))


@pytest.mark.parametrize("version,data_format", [("", "NHWC"), ("V2", "NHWC"), ("V2", "NCHW")])
def test_a_v1_or_v2_batch_norm_that_cannot_fold_becomes_one_fused_batch_norm_v3(version, data_format):
    def build():
        shape = [None, 3, 5, 5] if data_format == "NCHW" else [None, 5, 5, 3]
        bn = graphs.fused_batch_norm(tf.nn.relu(placeholder(shape)), 3, "bn", version=version,
                                     data_format=data_format)[0]
        tf.identity(bn, name="out")
    graph_def, _ = graphs.build(build)
    shape = (2, 3, 5, 5) if data_format == "NCHW" else (2, 5, 5, 3)
    folded, report = fold_and_compare(graph_def, {"x": graphs.random(shape)})
    assert report.folds == [] and "not from a supported linear op" in report.skips[0].reason
    [lowered] = report.lowered
    assert lowered.node == "bn" and lowered.into == "FusedBatchNormV3"
    bn = {n.name: n for n in folded.node}["bn"]
    assert bn.op == "FusedBatchNormV3" and not bn.attr["is_training"].b
    assert graphs.batch_norm_nodes(folded) == ["bn"] and compute_ops(folded) == compute_ops(graph_def)

    kept, kept_report = fold_and_compare(graph_def, {"x": graphs.random(shape)}, pipeline=NO_LOWERING)
    assert kept_report.lowered == [] and {n.name: n for n in kept.node}["bn"].op == "FusedBatchNorm" + version


def test_a_fused_batch_norm_v3_that_cannot_fold_stays_as_it_is():
    def build():
        bn = graphs.fused_batch_norm(tf.nn.relu(placeholder([None, 5, 5, 3])), 3, "bn", version="V3")[0]
        tf.identity(bn, name="out")
    graph_def, _ = graphs.build(build)
    folded, report = fold_and_compare(graph_def, {"x": graphs.random((2, 5, 5, 3))})
    assert report.lowered == [] and report.folds == []
    before, after = ({n.name: n for n in g.node}["bn"] for g in (graph_def, folded))
    assert after.SerializeToString(deterministic=True) == before.SerializeToString(deterministic=True)
    assert compute_ops(folded) == compute_ops(graph_def)


@pytest.mark.parametrize("scale_after_normalization", [True, False])
def test_a_global_normalization_that_cannot_fold_becomes_one_fused_batch_norm_v3(scale_after_normalization):
    """The old op cannot be imported into a graph of GraphDef version 9 or later (the written
    model's), so it is rewritten; fold_and_compare runs both graphs and compares."""
    graph_def = global_normalization_graph("Conv2D", scale_after_normalization, second_consumer=True)
    folded, report = fold_and_compare(graph_def, {"x": graphs.random((2, 6, 6, 3))}, ["out", "side"])
    assert report.folds == [] and [x.node for x in report.lowered] == ["bn"]
    assert "BatchNormWithGlobalNormalization" not in ops_of(folded) and ops_of(folded)["FusedBatchNormV3"] == 1
    assert compute_ops(folded) == compute_ops(graph_def)


def test_a_training_mode_batch_norm_is_not_lowered():
    def build():
        bn = graphs.fused_batch_norm(tf.nn.relu(placeholder([None, 5, 5, 3])), 3, "bn", is_training=True)[0]
        tf.identity(bn, name="out")
    graph_def, _ = graphs.build(build)
    folded, report = fold_and_compare(graph_def, {"x": graphs.random((2, 5, 5, 3))})
    assert report.lowered == [] and graphs.batch_norm_nodes(folded) == ["bn"]


# --- a batch norm after a ConcatV2 of convs (CSP blocks, tensorflow issue 41391) --------------

def concat_graph(axis=-1, second_consumer=False, relu_branch=False, keras3=False):
    def build():
        x = placeholder([None, 6, 6, 3])
        a = tf.nn.bias_add(conv(x, 3, 4, name="conv_a"), channel_const([1, 2, 3, 4], "bias_a"))
        b = conv(x, 3, 3 if axis == -1 else 4, name="conv_b")
        if relu_branch:
            b = tf.nn.relu(b, name="relu_b")
        joined = tf.concat([a, b], axis, name="joined")
        channels = 7 if axis == -1 else 4
        if keras3:
            gamma, beta, mean, variance = graphs.bn_params(channels)
            scale = gamma / np.sqrt(variance + 1e-3)
            y = tf.add(tf.multiply(joined, channel_const(scale, "scale")), channel_const(beta - mean * scale, "shift"),
                       name="bn")
        else:
            y = graphs.fused_batch_norm(joined, channels, "bn")[0]
        tf.identity(y, name="out")
        if second_consumer:
            tf.nn.relu(a, name="side")
    return graphs.build(build)[0]


@pytest.mark.parametrize("keras3", [False, True])
def test_batch_norm_after_a_channel_concat_of_convs_folds_into_each(keras3):
    folded, report = fold_and_compare(concat_graph(keras3=keras3), {"x": graphs.random((2, 6, 6, 3))})
    [fold] = report.folds
    assert fold.node == "bn" and fold.linear_node == "conv_a + conv_b"
    nodes = {n.name: n for n in folded.node}
    assert nodes["bn"].op == "Identity" and nodes["bn"].input[0] == "joined"
    # Each conv has its new kernel and its own bias (conv_a's old bias absorbed), before the concat.
    for position, linear in enumerate(["conv_a", "conv_b"]):
        bias = nodes[nodes["joined"].input[position]]
        assert bias.op == "BiasAdd" and bias.input[0] == linear
        assert nodes[linear].input[1].endswith("_bn_folded")
    ops = ops_of(folded)
    assert ops["BiasAdd"] == 2 and not {"Mul", "AddV2", "FusedBatchNormV3"} & set(ops)


@pytest.mark.parametrize("case,reason", [
    ("second_consumer", "has 2 consumers"), ("relu_branch", "not from a supported linear op"),
    ("batch_axis", "does not join its inputs along their channels")])
def test_batch_norm_after_a_concat_that_cannot_split_is_left_with_the_reason(case, reason):
    graph_def = concat_graph(axis=1 if case == "batch_axis" else -1, second_consumer=case == "second_consumer",
                             relu_branch=case == "relu_branch")
    outputs = ["out", "side"] if case == "second_consumer" else ["out"]
    folded, report = fold_and_compare(graph_def, {"x": graphs.random((2, 6, 6, 3))}, outputs, pipeline=NO_LOWERING)
    assert report.folds == []
    [skip] = pass_report(report, "fold_batch_norm").skips
    assert skip.node == "bn" and reason in skip.reason
    assert graphs.batch_norm_nodes(folded) == ["bn"]
