"""What the passes left alone, grouped by batch norm: a batch norm that uses the batch's
statistics is named as such, however many of its ops were left alone; per-sample statistics (a
layer norm's) are not training mode."""

import pytest
import tensorflow as tf

import graphs
from tf_bnfuse.passes import left_alone
from tf_bnfuse.passes import runner

pytestmark = pytest.mark.quick

PIPELINE = ["fold_batch_norm", "fold_affine", "fold_forward", "cleanup"]


def _normalized(x, axes, scope):
    with tf.name_scope(scope):
        mean, variance = tf.nn.moments(x, axes=axes, keepdims=True)
        return (x - mean) * tf.math.rsqrt(variance + 1e-3) * 0.5 + 0.25


def _graph():
    """conv -> batch-statistics norm ("batch"), conv -> layer norm ("layer"), conv -> fused batch
    norm with is_training ("fused") and one without ("frozen")."""
    def build():
        x = tf.compat.v1.placeholder(tf.float32, [None, 6, 6, 3], name="x")
        conv = lambda y, name: tf.nn.conv2d(y, graphs.const(graphs.random((1, 1, 3, 3)), name + "_w"), 1, "SAME",
                                            name=name)
        batch = _normalized(conv(x, "c1"), [0, 1, 2], "batch")
        layer = _normalized(conv(batch, "c2"), [-1], "layer")
        fused = graphs.fused_batch_norm(conv(layer, "c3"), 3, "fused", is_training=True)[0]
        tf.identity(graphs.fused_batch_norm(conv(fused, "c4"), 3, "frozen")[0], name="out")
    return graphs.build(build)[0]


def test_batch_statistics_are_found_by_fused_is_training_and_by_moments_over_the_batch_axis():
    assert left_alone.batch_statistics_scopes(_graph()) == {"batch", "fused"}


def test_each_training_mode_batch_norm_is_one_entry_with_the_users_reason_and_its_ops_under_it():
    _, report = runner.fold_graph(_graph(), ["out"], PIPELINE)
    by_name = {entry.name: entry for entry in report.left_alone}
    assert by_name["batch"].reason == by_name["fused"].reason == left_alone.TRAINING_MODE
    assert [op.op for op in by_name["fused"].ops] == ["FusedBatchNormV3"]
    assert all(op.node == name or op.node.startswith(name + "/") for name, entry in by_name.items()
               for op in entry.ops)
    assert "frozen" not in by_name and "frozen" in [f.node for f in report.folds]


def test_raw_ops_in_one_function_call_are_one_entry_each():
    """Batch norms in a tf.function without layers share the call's scope, not one entry."""
    def build():
        x = tf.compat.v1.placeholder(tf.float32, [None, 6, 6, 3], name="x")
        with tf.name_scope("StatefulPartitionedCall"):
            outs = []
            for name in ("a", "b"):
                conv = tf.nn.conv2d(x, graphs.const(graphs.random((1, 1, 3, 3)), name + "_w"), 1, "SAME",
                                    name=name + "_conv")
                outs += [graphs.fused_batch_norm(conv, 3, name + "_bn")[0], tf.nn.relu(conv)]  # conv: 2 consumers
        tf.identity(tf.add_n(outs), name="out")
    _, report = runner.fold_graph(graphs.build(build)[0], ["out"], PIPELINE)
    assert [entry.name for entry in report.left_alone] == ["StatefulPartitionedCall/a_bn", "StatefulPartitionedCall/b_bn"]
    assert all("2 consumers" in entry.reason for entry in report.left_alone)


def test_raw_moments_in_a_function_call_do_not_mark_the_call_training_mode():
    """tf.nn.moments over the batch with no layer around it: its own scope is training mode, a
    batch norm left alone beside it in the same call keeps its own reason."""
    def build():
        x = tf.compat.v1.placeholder(tf.float32, [None, 6, 6, 3], name="x")
        with tf.name_scope("StatefulPartitionedCall"):
            y = tf.nn.conv2d(x, graphs.const(graphs.random((1, 1, 3, 3)), "w1"), 1, "SAME")
            mean, variance = tf.nn.moments(y, axes=[0, 1, 2], keepdims=True)
            batch = (y - mean) * tf.math.rsqrt(variance + 1e-3)
            conv = tf.nn.conv2d(batch, graphs.const(graphs.random((1, 1, 3, 3)), "w2"), 1, "SAME", name="conv")
            out = graphs.fused_batch_norm(conv, 3, "bn")[0] + tf.nn.relu(conv)  # conv: 2 consumers
        tf.identity(out, name="out")
    graph_def = graphs.build(build)[0]
    assert left_alone.batch_statistics_scopes(graph_def) == {"StatefulPartitionedCall/moments"}
    _, report = runner.fold_graph(graph_def, ["out"], PIPELINE)
    by_name = {entry.name: entry for entry in report.left_alone}
    assert "2 consumers" in by_name["StatefulPartitionedCall/bn"].reason
