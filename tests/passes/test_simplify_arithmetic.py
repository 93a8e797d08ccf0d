"""simplify_arithmetic on hand-built GraphDefs; the reference is TensorFlow running the original."""

import numpy as np
import pytest
import tensorflow as tf

import graphs

pytestmark = pytest.mark.quick  # the quick tier (scripts/test.sh --quick)

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
        tf.multiply(d, one, name="out")  # a signature output: stays, as Identity
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
        return [t.op.name for t in (reciprocal, negated, almost)]
    folded, report = _fold_and_compare(build, {"x": graphs.random((2, 4)) + 3.0})
    ops = {n.name: n.op for n in folded.node}
    assert ops["one_over_x"] == "RealDiv" and ops["zero_minus_x"] == "Sub" and ops["almost"] == "Mul"
    assert report.passes[0].note.startswith("0 ")


def test_a_broadcast_constant_of_ones_or_zeros_goes_only_where_it_keeps_the_shape():
    """Keras' Normalization with mean 0 and variance 1 is (x - zeros) / ones with [1, 1, 1, C]
    constants: they go where x's static shape shows the broadcast changes nothing."""
    def build():
        image = tf.compat.v1.placeholder(tf.float32, [None, 5, 5, 3], name="image")
        ones, zeros = np.ones((1, 1, 1, 3), np.float32), np.zeros((1, 1, 1, 3), np.float32)
        centred = tf.subtract(image, graphs.const(zeros, "mean"), name="centred")
        scaled = tf.math.divide(centred, graphs.const(ones, "std"), name="scaled")
        times_row = tf.multiply(scaled, graphs.const(np.ones((5, 1, 3), np.float32), "row"), name="times_row")
        # The same constants where the broadcast would change the shape, or cannot be known to keep it:
        one_channel = tf.compat.v1.placeholder(tf.float32, [None, 5, 5, 1], name="one_channel")
        widened = tf.multiply(one_channel, graphs.const(ones, "widen"), name="widened")  # [.., 1] -> [.., 3]
        vector = tf.compat.v1.placeholder(tf.float32, [3], name="vector")
        lifted = tf.add(vector, graphs.const(zeros, "lift"), name="lifted")  # rank 1 -> rank 4
        unknown = tf.compat.v1.placeholder(tf.float32, [None, 5, 5, None], name="unknown")
        maybe = tf.multiply(unknown, graphs.const(ones, "maybe_ones"), name="maybe")  # channels unknown
        return [t.op.name for t in (times_row, widened, lifted, maybe)]
    feeds = {"image": graphs.random((2, 5, 5, 3)), "one_channel": graphs.random((2, 5, 5, 1)),
             "vector": graphs.random((3,)), "unknown": graphs.random((2, 5, 5, 3))}
    folded, report = _fold_and_compare(build, feeds)
    ops = {n.name: n.op for n in folded.node}
    assert not {"centred", "scaled", "times_row"} & {n for n, op in ops.items() if op in ("Sub", "RealDiv", "Mul")}
    assert ops["widened"] == "Mul" and ops["lifted"] == "AddV2" and ops["maybe"] == "Mul"
    assert report.passes[0].note == "3 x*1, x/1, x+0, x-0 removed"
