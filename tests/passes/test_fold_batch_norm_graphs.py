"""fold_batch_norm on hand-built GraphDefs.

The reference is always TensorFlow executing the original, unfolded graph.
"""

import random

import numpy as np
import pytest
import tensorflow as tf

import graphs
from tf_bnfuse import fold_graph_def
from tf_bnfuse.passes.context import PassContext
from tf_bnfuse.passes import fold_batch_norm

pytestmark = pytest.mark.quick  # the quick tier (scripts/test.sh --quick)

STORE_EVERY_WEIGHT = True  # conftest: run_pipeline holds every Const outside the proto

FOLD_ONLY = {"pipeline": ["fold_batch_norm", "cleanup"]}


def fold_and_compare(graph_def, feeds, outputs, rtol=1e-5):
    return graphs.fold_and_compare(graph_def, feeds, outputs, FOLD_ONLY, rtol)


def placeholder(shape, name="x", dtype=tf.float32):
    return tf.compat.v1.placeholder(dtype, shape, name=name)


def conv_case(op_name, data_format):
    """Returns (linear output, channels, input shape, bn data_format) for one linear op."""
    channel_first = data_format in ("NCHW", "NCDHW")
    if op_name == "Conv2D":
        shape = [None, 3, 8, 8] if channel_first else [None, 8, 8, 3]
        strides = [1, 1, 1, 1]
        y = tf.raw_ops.Conv2D(input=placeholder(shape), filter=graphs.const(graphs.random((3, 3, 3, 4)), "w"),
                              strides=strides, padding="SAME", data_format=data_format, name="linear")
        return y, 4, shape
    if op_name == "DepthwiseConv2dNative":
        shape = [None, 3, 8, 8] if channel_first else [None, 8, 8, 3]
        y = tf.raw_ops.DepthwiseConv2dNative(
            input=placeholder(shape), filter=graphs.const(graphs.random((3, 3, 3, 2)), "w"),
            strides=[1, 1, 1, 1], padding="SAME", data_format=data_format, name="linear")
        return y, 6, shape
    if op_name == "Conv3D":
        shape = [None, 3, 4, 6, 6] if channel_first else [None, 4, 6, 6, 3]
        y = tf.raw_ops.Conv3D(input=placeholder(shape), filter=graphs.const(graphs.random((2, 3, 3, 3, 4)), "w"),
                              strides=[1] * 5, padding="SAME", data_format=data_format, name="linear")
        return y, 4, shape
    if op_name == "Conv2DBackpropInput":
        shape = [2, 3, 4, 4] if channel_first else [2, 4, 4, 3]
        sizes = [2, 5, 8, 8] if channel_first else [2, 8, 8, 5]
        strides = [1, 1, 2, 2] if channel_first else [1, 2, 2, 1]
        y = tf.raw_ops.Conv2DBackpropInput(
            input_sizes=sizes, filter=graphs.const(graphs.random((3, 3, 5, 3)), "w"),
            out_backprop=placeholder(shape), strides=strides, padding="SAME", data_format=data_format,
            name="linear")
        return y, 5, shape
    raise ValueError(op_name)


def feed_for(shape, batch=2):
    return {"x": graphs.random([batch if d is None else d for d in shape])}


CASES = [
    ("Conv2D", "NHWC", "NHWC"), ("Conv2D", "NCHW", "NCHW"),
    ("DepthwiseConv2dNative", "NHWC", "NHWC"), ("DepthwiseConv2dNative", "NCHW", "NCHW"),
    ("Conv3D", "NDHWC", "NDHWC"), ("Conv3D", "NCDHW", "NCDHW"),
    ("Conv2DBackpropInput", "NHWC", "NHWC"), ("Conv2DBackpropInput", "NCHW", "NCHW"),
]


# FusedBatchNorm and V2 take only 4-D inputs; V3 also takes 5-D.
VERSIONED_CASES = [case + (version,) for case in CASES for version in ("", "V2", "V3")
                   if version == "V3" or case[2] not in ("NDHWC", "NCDHW")]


@pytest.mark.parametrize("op_name,conv_format,bn_format,version", VERSIONED_CASES)
def test_every_linear_op_and_format_folds(op_name, conv_format, bn_format, version):
    shapes = {}

    def build():
        y, channels, shapes["x"] = conv_case(op_name, conv_format)
        bn = graphs.fused_batch_norm(y, channels, "bn", version=version, data_format=bn_format)
        tf.identity(bn[0], name="out")

    graph_def, _ = graphs.build(build)
    folded, report = fold_and_compare(graph_def, feed_for(shapes["x"]), ["out"])
    assert graphs.batch_norm_nodes(folded) == []
    assert [(f.node, f.linear_node, f.linear_op) for f in report.folds] == [("bn", "linear", op_name)]
    assert graphs.op_counts(folded)["BiasAdd"] == 1


def test_identity_chain_and_bias_add_between_conv_and_batch_norm():
    def build():
        w = tf.identity(tf.identity(graphs.const(graphs.random((3, 3, 3, 4)), "w"), name="w_read"), name="w_read2")
        y = tf.raw_ops.Conv2D(input=placeholder([None, 8, 8, 3]), filter=w, strides=[1, 1, 1, 1],
                              padding="VALID", name="conv")
        y = tf.identity(y, name="id1")
        y = tf.raw_ops.BiasAdd(value=y, bias=tf.identity(graphs.const(graphs.random(4), "b")), name="bias")
        y = tf.identity(tf.identity(y, name="id2"), name="id3")
        tf.nn.relu(graphs.fused_batch_norm(y, 4, "bn")[0], name="out")

    graph_def, _ = graphs.build(build)
    folded, report = fold_and_compare(graph_def, feed_for([None, 8, 8, 3]), ["out"])
    assert sorted(report.folds[0].absorbed) == ["bias", "id1", "id2", "id3"]
    assert {"id1", "id2", "id3", "bias", "w"}.isdisjoint(n.name for n in folded.node)
    assert graphs.op_counts(folded) == {"Placeholder": 1, "Const": 2, "Conv2D": 1, "BiasAdd": 1, "Relu": 1}


@pytest.mark.parametrize("bias_shape,data_format", [((4,), "NHWC"), ((4, 1, 1), "NCHW"), ((), "NHWC")])
def test_add_of_a_per_channel_constant_is_folded_as_bias(bias_shape, data_format):
    shape = [None, 3, 8, 8] if data_format == "NCHW" else [None, 8, 8, 3]

    def build():
        y = tf.raw_ops.Conv2D(input=placeholder(shape), filter=graphs.const(graphs.random((3, 3, 3, 4)), "w"),
                              strides=[1, 1, 1, 1], padding="SAME", data_format=data_format, name="conv")
        y = tf.raw_ops.AddV2(x=graphs.const(graphs.random(bias_shape), "b"), y=y, name="add")
        tf.identity(graphs.fused_batch_norm(y, 4, "bn", data_format=data_format)[0], name="out")

    graph_def, _ = graphs.build(build)
    folded, report = fold_and_compare(graph_def, feed_for(shape), ["out"])
    assert len(report.folds) == 1 and "AddV2" not in graphs.op_counts(folded)


@pytest.mark.parametrize("data_format", ["NHWC", "NCHW"])
def test_bias_add_in_either_data_format_is_folded(data_format):
    shape = [None, 3, 8, 8] if data_format == "NCHW" else [None, 8, 8, 3]

    def build():
        y = tf.raw_ops.Conv2D(input=placeholder(shape), filter=graphs.const(graphs.random((3, 3, 3, 4)), "w"),
                              strides=[1, 1, 1, 1], padding="SAME", data_format=data_format, name="conv")
        y = tf.raw_ops.BiasAdd(value=y, bias=graphs.const(graphs.random(4), "b"), data_format=data_format,
                               name="bias")
        tf.identity(graphs.fused_batch_norm(y, 4, "bn", data_format=data_format)[0], name="out")

    graph_def, _ = graphs.build(build)
    folded, report = fold_and_compare(graph_def, feed_for(shape), ["out"])
    assert report.folds[0].absorbed == ["bias"] and graphs.op_counts(folded)["BiasAdd"] == 1


def test_interleaved_branches_fold_both_pairs():
    """relu -> conv_1, conv_2 -> bn_1, bn_2 -> concat, with the node list shuffled."""
    def build():
        relu = tf.nn.relu(placeholder([None, 8, 8, 3]), name="relu")
        convs = [tf.raw_ops.Conv2D(input=relu, filter=graphs.const(graphs.random((3, 3, 3, 4)), "w%d" % i),
                                   strides=[1, 1, 1, 1], padding="SAME", name="conv_%d" % i) for i in (1, 2)]
        bns = [graphs.fused_batch_norm(c, 4, "bn_%d" % i)[0] for i, c in zip((1, 2), convs)]
        tf.concat(bns, axis=-1, name="concat")

    graph_def, _ = graphs.build(build)
    nodes = list(graph_def.node)
    random.Random(3).shuffle(nodes)
    del graph_def.node[:]
    graph_def.node.extend(nodes)
    folded, report = fold_and_compare(graph_def, feed_for([None, 8, 8, 3]), ["concat"])
    assert sorted((f.node, f.linear_node) for f in report.folds) == [("bn_1", "conv_1"), ("bn_2", "conv_2")]
    assert graphs.batch_norm_nodes(folded) == []


def test_shared_kernel_gets_one_folded_copy_per_batch_norm_and_the_original_is_kept():
    kernel = graphs.random((3, 3, 3, 4))

    def build():
        x = placeholder([None, 8, 8, 3])
        w = tf.identity(graphs.const(kernel, "shared_w"), name="shared_w_read")
        outs = []
        for i in (1, 2):
            conv = tf.raw_ops.Conv2D(input=x, filter=w, strides=[1, 1, 1, 1], padding="SAME", name="conv_%d" % i)
            outs.append(graphs.fused_batch_norm(conv, 4, "bn_%d" % i)[0])
        # A third user of the same kernel, with no batch norm: it must see the original values.
        outs.append(tf.raw_ops.Conv2D(input=x, filter=w, strides=[1, 1, 1, 1], padding="SAME", name="plain"))
        tf.identity(tf.add_n(outs), name="out")
        tf.identity(outs[2], name="plain_out")

    graph_def, _ = graphs.build(build)
    folded, report = fold_and_compare(graph_def, feed_for([None, 8, 8, 3]), ["out", "plain_out"])
    assert len(report.folds) == 2
    by_name = {n.name: n for n in folded.node}
    kernels = {c: by_name[c].input[1] for c in ("conv_1", "conv_2")}
    assert kernels["conv_1"] != kernels["conv_2"]
    assert all(k.startswith("shared_w_bn_folded") for k in kernels.values())
    np.testing.assert_array_equal(tf.make_ndarray(by_name["shared_w"].attr["value"].tensor), kernel)
    assert by_name["plain"].input[1] == "shared_w_read"


def test_conv_output_with_a_second_consumer_is_left_alone_and_reported():
    def build():
        conv = tf.raw_ops.Conv2D(input=placeholder([None, 8, 8, 3]), filter=graphs.const(graphs.random((3, 3, 3, 4)), "w"),
                                 strides=[1, 1, 1, 1], padding="SAME", name="conv")
        bn = graphs.fused_batch_norm(conv, 4, "bn")[0]
        tf.concat([bn, tf.nn.relu(conv, name="relu")], -1, name="out")

    graph_def, _ = graphs.build(build)
    folded, report = fold_and_compare(graph_def, feed_for([None, 8, 8, 3]), ["out"])
    assert report.folds == []
    [skip] = report.skips
    assert skip.node == "bn" and "conv has 2 consumers" in skip.reason
    assert graphs.batch_norm_nodes(folded) == ["bn"]


def test_conv_output_that_is_also_a_graph_output_is_left_alone():
    def build():
        conv = tf.raw_ops.Conv2D(input=placeholder([None, 8, 8, 3]), filter=graphs.const(graphs.random((3, 3, 3, 4)), "w"),
                                 strides=[1, 1, 1, 1], padding="SAME", name="conv")
        tf.identity(graphs.fused_batch_norm(conv, 4, "bn")[0], name="out")

    graph_def, _ = graphs.build(build)
    folded, report = fold_and_compare(graph_def, feed_for([None, 8, 8, 3]), ["out", "conv"])
    assert report.folds == [] and "graph output" in report.skips[0].reason


def _conv_bn_graph(**bn_kwargs):
    def build():
        conv = tf.raw_ops.Conv2D(input=placeholder([None, 8, 8, 3]), filter=graphs.const(graphs.random((3, 3, 3, 4)), "w"),
                                 strides=[1, 1, 1, 1], padding="SAME", name="conv")
        bn = graphs.fused_batch_norm(conv, 4, "bn", **bn_kwargs)
        tf.identity(bn[0], name="out")
        return bn
    return graphs.build(build)[0]


def test_training_mode_batch_norm_is_never_folded():
    graph_def = _conv_bn_graph(is_training=True)
    folded, report = fold_and_compare(graph_def, feed_for([None, 8, 8, 3]), ["out"])
    assert report.folds == [] and "training mode" in report.skips[0].reason


def test_missing_is_training_attr_means_training_mode():
    graph_def = _conv_bn_graph(is_training=True)
    for node in graph_def.node:
        if node.name == "bn":
            del node.attr["is_training"]  # the op's default is true
    _, report = fold_graph_def(graph_def, ["out"], FOLD_ONLY)
    assert report.folds == [] and "training mode" in report.skips[0].reason


def test_non_constant_statistics_are_not_folded():
    def build():
        conv = tf.raw_ops.Conv2D(input=placeholder([None, 8, 8, 3]), filter=graphs.const(graphs.random((3, 3, 3, 4)), "w"),
                                 strides=[1, 1, 1, 1], padding="SAME", name="conv")
        mean = placeholder([4], name="mean")
        gamma, beta, _, var = graphs.bn_params(4)
        bn = tf.raw_ops.FusedBatchNormV3(x=conv, scale=gamma, offset=beta, mean=mean, variance=var,
                                         is_training=False, name="bn")
        tf.identity(bn[0], name="out")

    graph_def, _ = graphs.build(build)
    feeds = dict(feed_for([None, 8, 8, 3]), mean=graphs.random(4))
    _, report = fold_and_compare(graph_def, feeds, ["out"])
    assert report.folds == [] and "mean (mean) is not constant" in report.skips[0].reason


def test_non_constant_kernel_is_not_folded():
    def build():
        w = placeholder([3, 3, 3, 4], name="w")
        conv = tf.raw_ops.Conv2D(input=placeholder([None, 8, 8, 3]), filter=w, strides=[1, 1, 1, 1],
                                 padding="SAME", name="conv")
        tf.identity(graphs.fused_batch_norm(conv, 4, "bn")[0], name="out")

    graph_def, _ = graphs.build(build)
    feeds = dict(feed_for([None, 8, 8, 3]), w=graphs.random((3, 3, 3, 4)))
    _, report = fold_and_compare(graph_def, feeds, ["out"])
    assert report.folds == [] and "kernel w of conv is not constant" in report.skips[0].reason


def test_batch_norm_whose_statistics_outputs_are_used_is_not_folded():
    def build():
        conv = tf.raw_ops.Conv2D(input=placeholder([None, 8, 8, 3]), filter=graphs.const(graphs.random((3, 3, 3, 4)), "w"),
                                 strides=[1, 1, 1, 1], padding="SAME", name="conv")
        bn = graphs.fused_batch_norm(conv, 4, "bn")
        tf.identity(bn[0], name="out")
        tf.identity(bn[1], name="stat")

    graph_def, _ = graphs.build(build)
    _, report = fold_and_compare(graph_def, feed_for([None, 8, 8, 3]), ["out", "stat"])
    assert report.folds == [] and "statistics outputs [1]" in report.skips[0].reason


def test_batch_norm_after_an_activation_is_not_folded():
    def build():
        conv = tf.raw_ops.Conv2D(input=placeholder([None, 8, 8, 3]), filter=graphs.const(graphs.random((3, 3, 3, 4)), "w"),
                                 strides=[1, 1, 1, 1], padding="SAME", name="conv")
        tf.identity(graphs.fused_batch_norm(tf.nn.relu(conv, name="relu"), 4, "bn")[0], name="out")

    graph_def, _ = graphs.build(build)
    _, report = fold_and_compare(graph_def, feed_for([None, 8, 8, 3]), ["out"])
    assert report.folds == [] and "relu (Relu), not from a supported linear op" in report.skips[0].reason


def test_batch_norm_with_a_data_format_other_than_the_conv_is_not_folded():
    def build():
        conv = tf.raw_ops.Conv2D(input=placeholder([None, 8, 8, 3]), filter=graphs.const(graphs.random((3, 3, 3, 8)), "w"),
                                 strides=[1, 1, 1, 1], padding="SAME", name="conv")
        # NCHW reads the 8 rows as channels; numerically valid, but not per conv channel.
        tf.identity(graphs.fused_batch_norm(conv, 8, "bn", data_format="NCHW")[0], name="out")

    graph_def, _ = graphs.build(build)
    _, report = fold_and_compare(graph_def, feed_for([None, 8, 8, 3]), ["out"])
    assert report.folds == [] and "data_format NCHW does not match" in report.skips[0].reason


def test_nan_in_statistics_is_not_folded():
    gamma, beta, mean, var = graphs.bn_params(4)
    var[2] = np.nan
    graph_def = _conv_bn_graph(params=(gamma, beta, mean, var))
    _, report = fold_graph_def(graph_def, ["out"], FOLD_ONLY)
    assert report.folds == [] and "NaN or Inf" in report.skips[0].reason


@pytest.mark.parametrize("conv_dtype,tolerance", [(np.float16, 2e-2), (tf.bfloat16.as_numpy_dtype, 1e-1)])
def test_half_precision_conv_with_float32_statistics(conv_dtype, tolerance):
    def build():
        x = placeholder([None, 8, 8, 3], dtype=tf.as_dtype(conv_dtype))
        conv = tf.raw_ops.Conv2D(input=x, filter=graphs.const(graphs.random((3, 3, 3, 4)).astype(conv_dtype), "w"),
                                 strides=[1, 1, 1, 1], padding="SAME", name="conv")
        tf.identity(graphs.fused_batch_norm(conv, 4, "bn", version="V3")[0], name="out")

    graph_def, _ = graphs.build(build)
    feeds = {"x": graphs.random((2, 8, 8, 3)).astype(conv_dtype)}
    folded, report = fold_and_compare(graph_def, feeds, ["out"], rtol=tolerance)
    assert len(report.folds) == 1
    by_name = {n.name: n for n in folded.node}
    assert by_name["bn"].attr["T"].type == tf.as_dtype(conv_dtype).as_datatype_enum


def test_unknown_pass_name_is_rejected():
    from tf_bnfuse import errors
    with pytest.raises(errors.BadInputError, match="unknown pass 'no_such_pass'"):
        fold_graph_def(_conv_bn_graph(), ["out"], {"pipeline": ["no_such_pass"]})


def test_default_outputs_are_the_unread_tensors():
    graph_def = _conv_bn_graph()
    folded, report = fold_graph_def(graph_def)
    assert len(report.folds) == 1 and "out" in {n.name for n in folded.node}


def test_pass_module_interface_runs_alone():
    graph_def = _conv_bn_graph()
    new_graph_def, pass_report = fold_batch_norm.run(PassContext(), graph_def, ["out"])
    assert pass_report.pass_name == "fold_batch_norm" and len(pass_report.folds) == 1
    assert graphs.batch_norm_nodes(graph_def) == ["bn"]


@pytest.mark.parametrize("second_consumer", [False, True])
def test_dilated_conv_folds_through_batch_to_space(second_consumer):
    """SpaceToBatchND -> Conv2D -> BatchToSpaceND -> BiasAdd -> FusedBatchNormV3 (tf.nn.atrous_conv2d)."""
    def build():
        x = placeholder([None, 12, 12, 3])
        y = tf.nn.atrous_conv2d(x, graphs.const(graphs.random((3, 3, 3, 5)), "w"), rate=2, padding="SAME")
        y = tf.nn.bias_add(y, graphs.const(graphs.random((5,)), "b"))
        bn = graphs.fused_batch_norm(y, 5, "bn")[0]
        outputs = [tf.identity(bn, name="out").op.name]
        if second_consumer:
            outputs.append(tf.identity(tf.nn.relu(y), name="side").op.name)
        return outputs

    graph_def, outputs = graphs.build(build)
    assert {"SpaceToBatchND", "BatchToSpaceND"} <= {n.op for n in graph_def.node}
    folded, report = fold_and_compare(graph_def, {"x": graphs.random((2, 12, 12, 3))}, outputs)
    if second_consumer:
        assert report.folds == [] and "2 consumers" in report.skips[0].reason
        return
    [fold] = report.folds
    assert fold.linear_op == "Conv2D" and not graphs.batch_norm_nodes(folded)
    nodes = {n.name: n for n in folded.node}
    # SpaceToBatchND -> conv -> new bias -> BatchToSpaceND: the bias inside, where TFLite's
    # converter fuses the three into one dilated CONV_2D with its bias.
    batch_to_space = nodes[nodes["bn"].input[0]]
    assert nodes["bn"].op == "Identity" and batch_to_space.op == "BatchToSpaceND"
    bias = nodes[batch_to_space.input[0]]
    assert bias.op == "BiasAdd" and nodes[bias.input[0]].op == "Conv2D"


@pytest.mark.parametrize("with_bias", [False, True])
def test_matmul_reshaped_to_rank_4_folds_through_the_reshape(with_bias):
    """MatMul -> [BiasAdd] -> Reshape [-1, 1, 1, C] -> FusedBatchNormV3 -> Reshape back."""
    def build():
        x = placeholder([None, 7])
        y = tf.matmul(x, graphs.const(graphs.random((7, 6)), "w"), name="linear")
        if with_bias:
            y = tf.nn.bias_add(y, graphs.const(graphs.random((6,)), "b"))
        y = tf.reshape(y, [-1, 1, 1, 6], name="to_4d")
        bn = graphs.fused_batch_norm(y, 6, "bn")[0]
        return [tf.reshape(bn, [-1, 6], name="out").op.name]

    graph_def, outputs = graphs.build(build)
    folded, report = fold_and_compare(graph_def, {"x": graphs.random((3, 7))}, outputs)
    [fold] = report.folds
    assert fold.linear_op == "MatMul" and not graphs.batch_norm_nodes(folded)
    nodes = {n.name: n for n in folded.node}
    # The new bias sits before the Reshape, on the MatMul (where TFLite fuses it into
    # FULLY_CONNECTED); the batch norm's name is an Identity of the Reshape.
    assert nodes["bn"].op == "Identity" and nodes["bn"].input[0] == "to_4d"
    bias = nodes[nodes["to_4d"].input[0]]
    assert bias.op == "BiasAdd" and bias.input[0] == "linear"
    assert graphs.op_counts(folded).get("BiasAdd") == 1  # the old bias went into the new one


def test_bias_before_batch_to_space_is_absorbed_not_added_twice():
    """conv -> BiasAdd -> BatchToSpaceND -> FusedBatchNormV3: the new bias replaces the old one."""
    def build():
        x = placeholder([None, 12, 12, 3])
        y = tf.space_to_batch_nd(x, [2, 2], [[2, 2], [2, 2]])
        y = tf.nn.conv2d(y, graphs.const(graphs.random((3, 3, 3, 5)), "w"), 1, "SAME", name="linear")
        y = tf.nn.bias_add(y, graphs.const(graphs.random((5,)), "b"))
        y = tf.compat.v1.batch_to_space_nd(y, [2, 2], [[2, 2], [2, 2]])
        return [tf.identity(graphs.fused_batch_norm(y, 5, "bn")[0], name="out").op.name]

    graph_def, outputs = graphs.build(build)
    folded, report = fold_and_compare(graph_def, {"x": graphs.random((2, 12, 12, 3))}, outputs)
    assert len(report.folds) == 1 and graphs.op_counts(folded).get("BiasAdd") == 1


def test_reshape_that_moves_channels_is_left_alone():
    """Reshape [-1, 1, 2, 3] of 6 channels: each batch norm channel mixes two MatMul columns."""
    def build():
        x = placeholder([None, 7])
        y = tf.matmul(x, graphs.const(graphs.random((7, 6)), "w"), name="linear")
        y = tf.reshape(y, [-1, 1, 2, 3])
        return [tf.identity(graphs.fused_batch_norm(y, 3, "bn")[0], name="out").op.name]

    graph_def, outputs = graphs.build(build)
    folded, report = fold_and_compare(graph_def, {"x": graphs.random((3, 7))}, outputs)
    assert report.folds == [] and "does not keep the 6 channels" in report.skips[0].reason


def test_a_fold_that_would_overflow_a_float16_kernel_is_left_alone():
    """A float16 conv under a float32 batch norm of scale 1e5: W * scale does not fit float16."""
    def build():
        x = placeholder([None, 6, 6, 3], dtype=tf.float16)
        y = tf.nn.conv2d(x, graphs.const(graphs.random((3, 3, 3, 4), np.float16), "w"), 1, "SAME", name="linear")
        params = (np.full(4, 1e4, np.float32), np.zeros(4, np.float32), np.zeros(4, np.float32),
                  np.full(4, 1e-2, np.float32))
        return [tf.identity(graphs.fused_batch_norm(y, 4, "bn", params=params)[0], name="out").op.name]

    graph_def, outputs = graphs.build(build)
    folded, report = fold_graph_def(graph_def, outputs, FOLD_ONLY)
    assert report.folds == [] and "overflow float16" in report.skips[0].reason
    assert graphs.batch_norm_nodes(folded) == ["bn"]
