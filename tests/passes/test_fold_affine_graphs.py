"""constant_folding and fold_affine on hand-built GraphDefs.

The reference is TensorFlow executing the original graph.
"""

import numpy as np
import pytest
import tensorflow as tf

import graphs
from tf_bnfuse import fold_graph_def
from tf_bnfuse.passes.context import PassContext
from tf_bnfuse.passes import constant_folding

pytestmark = pytest.mark.quick  # the quick tier (scripts/test.sh --quick)

STORE_EVERY_WEIGHT = True  # conftest: run_pipeline holds every Const outside the proto

PIPELINE = {"pipeline": ["constant_folding", "fold_batch_norm", "fold_affine", "cleanup"]}


def fold_and_compare(graph_def, feeds, outputs, rtol=1e-5):
    return graphs.fold_and_compare(graph_def, feeds, outputs, PIPELINE, rtol)


def affine_report(report):
    return next(p for p in report.passes if p.pass_name == "fold_affine")


def placeholder(shape, name="x"):
    return tf.compat.v1.placeholder(tf.float32, shape, name=name)


def conv(x, cout=4, data_format="NHWC", name="conv"):
    cin = x.shape[1] if data_format == "NCHW" else x.shape[-1]
    return tf.raw_ops.Conv2D(input=x, filter=graphs.const(graphs.random((3, 3, cin, cout)), name + "_w"),
                             strides=[1, 1, 1, 1], padding="SAME", data_format=data_format, name=name)


def keras3_batch_norm(y, channels, name, shape=None):
    """Keras 3's export: scale and offset computed at run time from the statistics."""
    gamma, beta, mean, var = [tf.identity(graphs.const(v, "%s/%s" % (name, n)))
                              for v, n in zip(graphs.bn_params(channels), ("gamma", "beta", "mean", "var"))]
    scale = tf.math.rsqrt(var + 1e-3) * gamma
    offset = beta - mean * scale
    if shape is not None:
        scale, offset = tf.reshape(scale, shape), tf.reshape(offset, shape)
    return tf.raw_ops.AddV2(x=tf.raw_ops.Mul(x=y, y=scale, name=name + "/mul"), y=offset, name=name + "/add")


X = [None, 8, 8, 3]


def feed(shape=X):
    return {"x": graphs.random([2 if d is None else d for d in shape])}


def test_keras3_batch_norm_after_conv_and_bias_folds_to_one_bias_add():
    def build():
        y = conv(placeholder(X))
        y = tf.nn.bias_add(y, tf.reshape(tf.identity(graphs.const(graphs.random(4), "b")), [4]), name="bias")
        tf.nn.relu(keras3_batch_norm(y, 4, "bn"), name="out")

    graph_def, _ = graphs.build(build)
    folded, report = fold_and_compare(graph_def, feed(), ["out"])
    [fold] = affine_report(report).folds
    assert (fold.node, fold.linear_node) == ("bn/add", "conv")
    assert graphs.op_counts(folded) == {"Placeholder": 1, "Const": 2, "Conv2D": 1, "BiasAdd": 1, "Relu": 1}
    assert graphs.affine_after_linear(folded) == []


@pytest.mark.parametrize("op,const_first", [("Mul", False), ("Mul", True), ("RealDiv", False),
                                            ("Sub", False), ("Add", True), ("AddV2", False)])
def test_each_affine_op_folds(op, const_first):
    def build():
        c = graphs.const(graphs.random(4) + 3.0, "c")  # away from zero for RealDiv
        y = conv(placeholder(X))
        args = (c, y) if const_first else (y, c)
        z = getattr(tf.raw_ops, op)(x=args[0], y=args[1], name="affine")
        # A second op so there is a chain to fold, by a scalar. (Not Mul: TF 2.21's
        # own Grappler aborts the process running Mul(RealDiv(Conv2D, c), scalar),
        # "Check failed: size >= 0" in MulConvPushDown.)
        z = tf.raw_ops.AddV2(x=z, y=graphs.const(np.float32(0.5), "half"), name="shift_half")
        tf.identity(z, name="out")

    graph_def, _ = graphs.build(build)
    folded, report = fold_and_compare(graph_def, feed(), ["out"])
    assert len(affine_report(report).folds) == 1
    assert graphs.affine_after_linear(folded) == [] and op not in graphs.op_counts(folded)


@pytest.mark.parametrize("op,form", [("Sub", "c - x"), ("RealDiv", "c / x")])
def test_constant_as_minuend_or_dividend_is_left_alone(op, form):
    def build():
        z = getattr(tf.raw_ops, op)(x=graphs.const(graphs.random(4) + 3.0, "c"), y=conv(placeholder(X)), name="affine")
        tf.raw_ops.Mul(x=z, y=graphs.const(graphs.random(4), "s"), name="out")

    graph_def, _ = graphs.build(build)
    folded, report = fold_and_compare(graph_def, feed(), ["out"])
    assert affine_report(report).folds == []
    assert any(form in s.reason for s in affine_report(report).skips)


def test_mul_by_a_constant_varying_along_a_spatial_axis_is_left_alone():
    def build():
        y = conv(placeholder(X))
        tf.raw_ops.Mul(x=y, y=graphs.const(graphs.random((8, 1, 4)), "spatial"), name="out")

    graph_def, _ = graphs.build(build)
    _, report = fold_and_compare(graph_def, feed(), ["out"])
    [skip] = affine_report(report).skips
    assert skip.node == "out" and "varies along a non-channel axis" in skip.reason


def test_mul_after_an_activation_is_left_alone_with_the_reason():
    def build():
        y = tf.nn.relu(conv(placeholder(X)), name="relu")
        tf.identity(keras3_batch_norm(y, 4, "bn"), name="out")

    graph_def, _ = graphs.build(build)
    _, report = fold_and_compare(graph_def, feed(), ["out"])
    [skip] = affine_report(report).skips
    assert skip.node == "bn/mul" and "relu (Relu), not from a supported linear op" in skip.reason


@pytest.mark.parametrize("scaled_first", [False, True])
def test_a_batch_norm_under_a_bias_after_an_activation_is_still_reported(scaled_first):
    """The bias above the batch norm fails the same way and is not reported itself (a bias
    alone is no batch norm): the batch norm's Mul must be, not hidden behind it. A scale above
    that bias is the run's first reportable step: reported once, there."""
    def build():
        y = tf.nn.relu(conv(placeholder(X)), name="relu")
        if scaled_first:
            y = tf.raw_ops.Mul(x=y, y=graphs.const(graphs.random((4,)), "s"), name="scaled")
        y = tf.raw_ops.BiasAdd(value=y, bias=graphs.const(graphs.random((4,)), "b"), name="bias")
        tf.identity(keras3_batch_norm(y, 4, "bn"), name="out")

    graph_def, _ = graphs.build(build)
    _, report = fold_and_compare(graph_def, feed(), ["out"])
    [skip] = affine_report(report).skips
    assert skip.node == ("scaled" if scaled_first else "bn/mul")
    assert "relu (Relu), not from a supported linear op" in skip.reason


@pytest.mark.parametrize("x_shape, kernel_shape, adj_y", [
    ([None, 5, 6], (6, 4), False), ([None, 5, 6], (4, 6), True), ([3, 5, 6], (3, 6, 4), False)])
def test_keras3_batch_norm_after_a_batch_matmul_with_a_constant_kernel_folds(x_shape, kernel_shape, adj_y):
    """Keras 3's EinsumDense "abc,cd->abd" is BatchMatMulV2(x, W) -> BiasAdd: the batch norm on the
    last axis folds into W's output columns (adj_y: its rows), for a batched W too."""
    def build():
        w = graphs.const(graphs.random(kernel_shape), "w")
        y = tf.raw_ops.BatchMatMulV2(x=placeholder(x_shape), y=w, adj_y=adj_y, name="bmm")
        y = tf.nn.bias_add(y, graphs.const(graphs.random((4,)), "b"), name="bias")
        tf.identity(keras3_batch_norm(y, 4, "bn"), name="out")

    graph_def, _ = graphs.build(build)
    folded, report = fold_and_compare(graph_def, feed(x_shape), ["out"])
    [fold] = affine_report(report).folds
    assert fold.linear_node == "bmm" and fold.check.terms == 6 and affine_report(report).skips == []
    ops = graphs.op_counts(folded)
    assert "Mul" not in ops and "AddV2" not in ops and ops["BiasAdd"] == 1


def test_a_batch_norm_after_a_batch_matmul_of_two_tensors_is_left_alone():
    """Attention's scores: x @ y with no constant kernel to fold into."""
    def build():
        y = tf.raw_ops.BatchMatMulV2(x=placeholder([None, 5, 6]), y=placeholder([None, 6, 4], "k"), name="bmm")
        tf.identity(keras3_batch_norm(y, 4, "bn"), name="out")

    graph_def, _ = graphs.build(build)
    feeds = {"x": graphs.random((2, 5, 6)), "k": graphs.random((2, 6, 4))}
    _, report = fold_and_compare(graph_def, feeds, ["out"])
    [skip] = affine_report(report).skips
    assert skip.node == "bn/mul" and "is not constant" in skip.reason


def test_conv_feeding_batch_norm_and_relu_keeps_the_relu_branch():
    def build():
        y = conv(placeholder(X))
        tf.concat([keras3_batch_norm(y, 4, "bn"), tf.nn.relu(y)], -1, name="out")

    graph_def, _ = graphs.build(build)
    folded, report = fold_and_compare(graph_def, feed(), ["out"])
    assert affine_report(report).folds == []
    [skip] = affine_report(report).skips
    assert "conv has 2 consumers" in skip.reason
    w = {n.name: n for n in folded.node}["conv"].input[1]
    assert w == "conv_w", "the shared conv's kernel must not change"


def test_nchw_batch_norm_with_channel_shaped_constants_folds():
    def build():
        y = conv(placeholder([None, 3, 8, 8]), data_format="NCHW")
        tf.identity(keras3_batch_norm(y, 4, "bn", shape=[1, 4, 1, 1]), name="out")

    graph_def, _ = graphs.build(build)
    folded, report = fold_and_compare(graph_def, feed([None, 3, 8, 8]), ["out"])
    assert len(affine_report(report).folds) == 1
    assert {n.name: n for n in folded.node}["bn/add"].attr["data_format"].s == b"NCHW"


@pytest.mark.parametrize("transpose_b", [False, True])
def test_matmul_then_batch_norm_folds(transpose_b):
    def build():
        w = graphs.random((5, 6) if transpose_b else (6, 5))
        y = tf.raw_ops.MatMul(a=placeholder([None, 6]), b=graphs.const(w, "w"), transpose_b=transpose_b, name="mm")
        tf.identity(keras3_batch_norm(tf.nn.bias_add(y, graphs.const(graphs.random(5), "b")), 5, "bn"), name="out")

    graph_def, _ = graphs.build(build)
    folded, report = fold_and_compare(graph_def, feed([None, 6]), ["out"])
    assert len(affine_report(report).folds) == 1 and graphs.affine_after_linear(folded) == []


def test_conv1d_lowered_through_expand_dims_and_squeeze_folds():
    def build():
        x = placeholder([None, 10, 3])
        kernel = tf.expand_dims(tf.identity(graphs.const(graphs.random((3, 3, 4)), "k")), 0)
        y = tf.raw_ops.Conv2D(input=tf.expand_dims(x, 1), filter=kernel, strides=[1, 1, 1, 1], padding="VALID",
                              name="conv")
        y = tf.squeeze(y, [1], name="squeeze")
        y = tf.nn.bias_add(y, graphs.const(graphs.random(4), "b"))
        tf.identity(keras3_batch_norm(y, 4, "bn"), name="out")

    graph_def, _ = graphs.build(build)
    folded, report = fold_and_compare(graph_def, feed([None, 10, 3]), ["out"])
    [fold] = affine_report(report).folds
    assert fold.linear_op == "Conv2D"
    assert graphs.affine_after_linear(folded) == []
    assert "Squeeze" in graphs.op_counts(folded)


def test_constant_folding_evaluates_batch_norm_parameters_but_not_random_ops():
    def build():
        y = keras3_batch_norm(placeholder([None, 4]), 4, "bn")
        noise = tf.random.uniform([4], name="noise")  # stateful: must stay
        tf.identity(y + noise, name="out")

    graph_def, _ = graphs.build(build)
    folded, report = fold_graph_def(graph_def, ["out"], {"pipeline": ["constant_folding", "cleanup"]})
    ops = graphs.op_counts(folded)
    assert "Rsqrt" not in ops and "Sub" not in ops and "RandomUniform" in ops
    by_name = {n.name: n for n in folded.node}
    scale_name = by_name["bn/mul"].input[1]
    assert by_name[scale_name].op == "Const"
    # The evaluated value against TensorFlow running the original graph.
    expected = graphs.run(graph_def, {"x": graphs.random((2, 4))}, [scale_name])[0]
    np.testing.assert_allclose(tf.make_ndarray(by_name[scale_name].attr["value"].tensor), expected, rtol=1e-6)


def test_constant_folding_does_not_grow_a_small_constant_into_a_big_one():
    def build():
        small = graphs.const(np.ones([1, 4], np.float32), "small")
        big = tf.tile(small, [4096, 1], name="tiled")  # 64 KiB from 16 bytes
        tf.identity(placeholder([4096, 4]) + big, name="out")

    graph_def, _ = graphs.build(build)
    folded, report = fold_graph_def(graph_def, ["out"], {"pipeline": ["constant_folding", "cleanup"]})
    assert "Tile" in graphs.op_counts(folded)
    [skip] = report.passes[0].skips
    assert skip.node == "tiled" and "bigger than the constants" in skip.reason
    small_limit, _ = constant_folding.run(PassContext(), graph_def, ["out"], always_fold_bytes=1 << 20)
    assert "Tile" not in graphs.op_counts(small_limit)


def test_shared_kernel_with_two_keras3_batch_norms():
    def build():
        x = placeholder(X)
        w = tf.identity(graphs.const(graphs.random((3, 3, 3, 4)), "shared"))
        outs = [keras3_batch_norm(tf.nn.conv2d(x, w, 1, "SAME", name="conv_%d" % i), 4, "bn_%d" % i) for i in (1, 2)]
        tf.concat(outs, -1, name="out")

    graph_def, _ = graphs.build(build)
    folded, report = fold_and_compare(graph_def, feed(), ["out"])
    assert len(affine_report(report).folds) == 2
    by_name = {n.name: n for n in folded.node}
    assert by_name["conv_1"].input[1] != by_name["conv_2"].input[1]


def _called_conv_graph(activation=None, jit_compile=True):
    """x -> call f(kernel, x) -> scale -> shift, where f is a (jit_compile) tf.function running a conv
    (and an activation): the shape of a Keras grouped convolution."""
    kernel_value = graphs.random((3, 3, 2, 4))
    scale, shift = graphs.RNG.uniform(0.5, 2.0, 4).astype(np.float32), graphs.random((4,))

    @tf.function(jit_compile=jit_compile, autograph=False)
    def conv_fn(kernel, x):
        y = tf.nn.conv2d(x, kernel, 1, "SAME")
        return activation(y) if activation else y

    def build():
        x = placeholder([None, 6, 6, 2])
        y = conv_fn(graphs.const(kernel_value, "kernel"), x)
        tf.add(tf.multiply(y, graphs.const(scale, "scale"), name="scaled"), graphs.const(shift, "shift"),
                   name="out")
        return ["out"]
    return graphs.build(build)


def test_a_call_computing_one_conv_folds_across_the_call():
    graph_def, outputs = _called_conv_graph()
    assert any(n.op in ("PartitionedCall", "StatefulPartitionedCall") for n in graph_def.node)
    folded, report = fold_and_compare(graph_def, {"x": graphs.random((2, 6, 6, 2))}, outputs)
    [fold] = affine_report(report).folds
    assert fold.node == "out" and fold.linear_op.startswith("Conv2D in ")
    assert not {"Mul", "AddV2"} & {n.op for n in folded.node}
    # The function is the same: the call reads a new kernel constant instead.
    assert [f.signature.name for f in folded.library.function] == [f.signature.name for f in graph_def.library.function]


def test_a_call_that_also_applies_an_activation_is_left_alone_and_reported():
    graph_def, outputs = _called_conv_graph(activation=tf.nn.relu)
    folded, report = fold_and_compare(graph_def, {"x": graphs.random((2, 6, 6, 2))}, outputs)
    assert affine_report(report).folds == []
    assert [(s.node, "not from a supported linear op" in s.reason) for s in affine_report(report).skips] == [
        ("scaled", True)]
