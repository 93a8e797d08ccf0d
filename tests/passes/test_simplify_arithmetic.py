"""simplify_arithmetic on hand-built GraphDefs; the reference is TensorFlow running the original."""

import numpy as np
import tensorflow as tf

import graphs

STORE_EVERY_WEIGHT = True  # conftest: run_pipeline holds every Const outside the proto

PIPELINE = {"pipeline": ["simplify_arithmetic", "prune_identities", "cleanup"]}


def _fold_and_compare(build, feeds):
    graph_def, outputs = graphs.build(build)
    return graphs.fold_and_compare(graph_def, feeds, outputs, PIPELINE, rtol=0.0)


def test_identity_elements_are_removed_and_names_kept():
    def build():
        x = tf.compat.v1.placeholder(tf.float32, [2, 3], name="x")
        one, zero = graphs.const(np.float32(1.0), "one"), graphs.const(np.float32(0.0), "zero")
        a = tf.multiply(one, tf.nn.relu(x), name="one_times")  # 1 * relu(x)
        b = tf.math.divide(a, one, name="over_one")
        c = tf.add(zero, b, name="zero_plus")
        d = tf.subtract(c, zero, name="minus_zero")
        out = tf.multiply(d, one, name="out")  # a signature output: stays, as Identity
        return ["out"]
    folded, report = _fold_and_compare(build, {"x": graphs.random((2, 3))})
    assert [n.op for n in folded.node if n.op in ("Mul", "RealDiv", "AddV2", "Sub")] == []
    assert next(n for n in folded.node if n.name == "out").op == "Identity"
    assert report.passes[0].note == "5 x*1, x/1, x+0, x-0 removed"


def test_non_identity_forms_stay():
    def build():
        x = tf.compat.v1.placeholder(tf.float32, [2, 4], name="x")
        one, zero = graphs.const(np.float32(1.0), "one"), graphs.const(np.float32(0.0), "zero")
        reciprocal = tf.math.divide(one, x, name="one_over_x")  # 1 / x
        negated = tf.subtract(zero, x, name="zero_minus_x")  # 0 - x
        almost = tf.multiply(x, graphs.const(np.float32(1.0000001), "almost_one"), name="almost")
        # A [1, 4] constant of ones would broadcast a [4] input to [1, 4]: not taken.
        ones_row = tf.multiply(x, graphs.const(np.ones((1, 4), np.float32), "ones_row"), name="by_ones_row")
        return [t.op.name for t in (reciprocal, negated, almost, ones_row)]
    folded, report = _fold_and_compare(build, {"x": graphs.random((2, 4)) + 3.0})
    ops = {n.name: n.op for n in folded.node}
    assert ops["one_over_x"] == "RealDiv" and ops["zero_minus_x"] == "Sub"
    assert ops["almost"] == "Mul" and ops["by_ones_row"] == "Mul"
    assert report.passes[0].note.startswith("0 ")
