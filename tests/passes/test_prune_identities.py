"""prune_identities on hand-built GraphDefs; the reference is TensorFlow running the original."""

import numpy as np
import pytest
import tensorflow as tf

import graphs
from tf_bnfuse import fold_graph_def

pytestmark = pytest.mark.quick  # the quick tier (scripts/test.sh --quick)

PIPELINE = {"pipeline": ["prune_identities", "cleanup"]}


def _graph():
    """x -> Identity -> Identity -> Mul -> out, a variable written before a read that waits on it
    through a NoOp, and an Identity with a control input (a read after a write)."""
    def build():
        x = tf.compat.v1.placeholder(tf.float32, [2, 3], name="x")
        a = tf.identity(tf.identity(x, name="id1"), name="id2")
        scaled = tf.multiply(a, graphs.const(np.float32(3.0), "three"), name="scaled")
        tf.identity(scaled, name="out")  # a signature output: its name stays
        variable = tf.raw_ops.VarHandleOp(dtype=tf.float32, shape=[], shared_name="v", name="v")
        write = tf.raw_ops.AssignVariableOp(resource=variable, value=graphs.const(np.float32(5.0), "five"),
                                            name="write")
        with tf.control_dependencies([write]):
            gate = tf.no_op(name="gate")
        with tf.control_dependencies([gate]):
            read = tf.raw_ops.ReadVariableOp(resource=variable, dtype=tf.float32, name="read")
        with tf.control_dependencies([read]):
            ordered = tf.identity(x, name="ordered")  # waits for the read: must stay
        tf.add(ordered, read, name="total")
        return ["out", "total"]
    return graphs.build(build)


def test_bypasses_identities_and_noops_and_keeps_the_rest():
    graph_def, outputs = _graph()
    folded, report = fold_graph_def(graph_def, outputs, PIPELINE)
    nodes = {n.name: n for n in folded.node}
    assert "id1" not in nodes and "id2" not in nodes and "gate" not in nodes
    assert list(nodes["scaled"].input)[0] == "x"
    assert "^write" in nodes["read"].input, "the NoOp's ordering is kept as an edge from what it waited for"
    assert "out" in nodes and "ordered" in nodes, "outputs and ordering Identities stay"
    assert "bypassed" in report.passes[0].note

    feeds = {"x": graphs.random((2, 3))}
    expected = graphs.run(graph_def, feeds, outputs)
    actual = graphs.run(folded, feeds, outputs)
    for e, a in zip(expected, actual):
        np.testing.assert_array_equal(a, e)
    np.testing.assert_array_equal(actual[1], feeds["x"] + 5.0)  # the read saw the write


def test_a_control_edge_the_data_already_waits_for_is_dropped():
    def build():
        x = tf.compat.v1.placeholder(tf.float32, [3], name="x")
        y = tf.square(x, name="y")
        with tf.control_dependencies([y]):
            tf.add(y, 1.0, name="z")
        return ["z"]
    graph_def, outputs = graphs.build(build)
    folded, _ = fold_graph_def(graph_def, outputs, PIPELINE)
    assert list(next(n for n in folded.node if n.name == "z").input) == ["y", "z/y"]
    feeds = {"x": graphs.random((3,))}
    np.testing.assert_array_equal(graphs.run(folded, feeds, outputs)[0], graphs.run(graph_def, feeds, outputs)[0])
