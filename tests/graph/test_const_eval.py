"""const_eval against TensorFlow itself: the numpy shortcut must compute what a session computes."""

import numpy as np
import pytest
import tensorflow as tf

import graphs
from tf_bnfuse.graph import const_eval
from tf_bnfuse import graph as graph_lib

pytestmark = pytest.mark.quick  # the quick tier (scripts/test.sh --quick)


def _statistics_graph(dtype):
    """The Keras 3 batch norm statistics subgraph, plus reshapes, on constants."""
    rng = np.random.default_rng(5)
    c = 6

    def build():
        gamma = tf.constant(rng.uniform(0.5, 1.5, c).astype(dtype), name="gamma")
        beta = tf.constant(rng.normal(size=c).astype(dtype), name="beta")
        mean = tf.constant(rng.normal(size=c).astype(dtype), name="mean")
        var = tf.constant(rng.uniform(0.0, 2.0, c).astype(dtype), name="var")
        scale = tf.identity(gamma * tf.math.rsqrt(var + tf.constant(1e-3, dtype)), name="scale")
        offset = tf.subtract(beta, mean * scale, name="offset")
        shaped = tf.reshape(tf.expand_dims(offset, 0), [1, 1, 1, c], name="shaped")
        tf.squeeze(shaped, axis=[0, 1], name="squeezed")
        other = tf.sqrt(tf.maximum(var, tf.constant(0.1, dtype)) / tf.constant(3.0, dtype), name="other")
        tf.negative(tf.math.reciprocal(other) - tf.square(mean), name="neg")
        return ["scale", "offset", "shaped", "squeezed", "other", "neg"]

    return graphs.build(build)


def test_numpy_values_match_a_tensorflow_session():
    for dtype in (np.float32, np.float64):
        graph_def, names = _statistics_graph(dtype)
        index = graph_lib.GraphIndex(graph_def)
        expected = graphs.run(graph_def, {}, [n + ":0" for n in names])
        for name, reference in zip(names, expected):
            value = const_eval.evaluate(index, name + ":0")
            assert value is not None, name
            assert value.dtype == reference.dtype and value.shape == reference.shape, name
            np.testing.assert_allclose(value, reference, rtol=2e-7 if dtype == np.float32 else 1e-15,
                                       err_msg=name)


def test_ops_and_dtypes_numpy_does_not_mirror_are_left_to_tensorflow():
    def build():
        x = tf.constant(np.arange(6, dtype=np.float32).reshape(2, 3), name="x")
        tf.tile(x, [2, 1], name="tiled")
        tf.add(x, x, name="sum")
        h = tf.constant(np.ones(3, np.float16), name="h")
        tf.multiply(h, h, name="half_product")
        return None

    graph_def, _ = graphs.build(build)
    index = graph_lib.GraphIndex(graph_def)
    assert const_eval.evaluate(index, "tiled:0") is None
    assert const_eval.evaluate(index, "half_product:0") is None
    np.testing.assert_array_equal(const_eval.evaluate(index, "sum:0"), 2 * np.arange(6).reshape(2, 3))
