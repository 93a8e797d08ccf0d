"""fold_in_functions: a conv + batch norm inside a While body or an If branch.

Hand-built graphs with TF2 control flow (functional While/If); the reference is TF running
the unfolded graph.
"""

import pytest
import tensorflow as tf

import graphs

pytestmark = pytest.mark.quick  # the quick tier (scripts/test.sh --quick)

STORE_EVERY_WEIGHT = True  # conftest: run_pipeline holds every Const outside the proto

PIPELINE = {"pipeline": ["constant_folding", "fold_in_functions", "fold_batch_norm", "fold_affine", "cleanup"]}
X = (2, 6, 6, 3)


def conv_bn(y, kernel, name):
    conv = tf.nn.conv2d(y, kernel, 1, "SAME", name=name + "_conv")
    return graphs.fused_batch_norm(conv, 3, name + "_bn")[0]


def loop_graph(kernel_changes=False):
    def build():
        x = tf.compat.v1.placeholder(tf.float32, [None, 6, 6, 3], name="x")
        kernel = graphs.const(graphs.random((3, 3, 3, 3)) * 0.3, "w")

        def body(i, y, w):
            return i + 1, tf.nn.relu(conv_bn(y, w, "inner")), (w * 1.5 if kernel_changes else w)
        _, y, _ = tf.while_loop(lambda i, y, w: i < 3, body, [tf.constant(0), x, kernel])
        tf.identity(y, name="out")
    return graphs.build(build)[0]


def body_ops(graph_def):
    return {n.op for f in graph_def.library.function if "body" in f.signature.name for n in f.node_def}


def test_conv_and_batch_norm_in_a_while_body_fold_with_a_loop_invariant_kernel():
    graph_def = loop_graph()
    assert {"While", "StatelessWhile"} & set(graphs.op_counts(graph_def)) and "FusedBatchNormV3" in body_ops(graph_def)
    folded, report = graphs.fold_and_compare(graph_def, {"x": graphs.random(X)}, ["out"], PIPELINE)
    [fold] = report.folds
    assert fold.linear_op == "Conv2D" and "body" in fold.node.split("/")[0]
    assert "FusedBatchNormV3" not in body_ops(folded) and {"While", "StatelessWhile"} & set(graphs.op_counts(folded))


def test_a_kernel_the_loop_changes_is_not_folded_and_is_reported():
    graph_def = loop_graph(kernel_changes=True)
    folded, report = graphs.fold_and_compare(graph_def, {"x": graphs.random(X)}, ["out"], PIPELINE)
    assert report.folds == []
    [skip] = [s for s in report.skips if s.op == "FusedBatchNormV3"]  # (and the loop's w * 1.5)
    assert skip.op == "FusedBatchNormV3" and "body" in skip.node.split("/")[0] and "is not constant" in skip.reason
    # Not folded: a FusedBatchNormV3 stays one op, inside the body as anywhere else.
    assert report.lowered == [] and "FusedBatchNormV3" in body_ops(folded)


def test_conv_and_batch_norm_in_if_branches_fold():
    def build():
        x = tf.compat.v1.placeholder(tf.float32, [None, 6, 6, 3], name="x")
        flag = tf.compat.v1.placeholder(tf.bool, [], name="flag")
        kernels = [graphs.const(graphs.random((3, 3, 3, 3)), "w%d" % k) for k in range(2)]
        y = tf.cond(flag, lambda: conv_bn(x, kernels[0], "then"), lambda: conv_bn(x, kernels[1], "else"))
        tf.identity(y, name="out")
    graph_def, _ = graphs.build(build)
    assert "If" in graphs.op_counts(graph_def) or "StatelessIf" in graphs.op_counts(graph_def)
    for flag in (True, False):
        folded, report = graphs.fold_and_compare(graph_def, {"x": graphs.random(X), "flag": flag}, ["out"],
                                                 PIPELINE)
        assert len(report.folds) == 2
        assert not {n.op for f in folded.library.function for n in f.node_def} & {"FusedBatchNormV3"}
