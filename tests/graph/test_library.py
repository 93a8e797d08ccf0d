"""graph.is_deterministic: whether the verification may call the original once instead of twice."""

import pytest
import tensorflow as tf

from tf_bnfuse import graph as graph_lib

pytestmark = pytest.mark.quick  # the quick tier (scripts/test.sh --quick)

SPEC = tf.TensorSpec([1, 4, 4, 3], tf.float32)
KERNEL = tf.ones([3, 3, 3, 2])


def _graph_def(function):
    return tf.function(function).get_concrete_function(SPEC).graph.as_graph_def()


def _conv(x):
    return tf.nn.relu(tf.nn.conv2d(x, KERNEL, 1, "SAME"))


def test_a_graph_of_pure_ops_is_deterministic():
    assert graph_lib.is_deterministic(_graph_def(_conv))


def test_a_random_op_is_not_even_inside_a_called_function():
    assert not graph_lib.is_deterministic(_graph_def(lambda x: _conv(x) + tf.random.uniform([1, 4, 4, 2])))
    noisy = tf.function(lambda x: x + tf.random.normal(tf.shape(x)))
    graph_def = _graph_def(lambda x: _conv(noisy(x)))
    assert any(n.op in graph_lib.CALL_OPS for n in graph_def.node), "the random op is in a called function"
    assert not any(n.op.startswith("Random") for n in graph_def.node)
    assert not graph_lib.is_deterministic(graph_def)


def test_a_variable_read_or_an_op_tensorflow_does_not_know_is_not():
    variable = tf.Variable(KERNEL)
    assert not graph_lib.is_deterministic(_graph_def(lambda x: tf.nn.conv2d(x, variable, 1, "SAME")))
    graph_def = _graph_def(_conv)
    graph_def.node.add(name="custom", op="SomeoneElsesOp")
    assert not graph_lib.is_deterministic(graph_def)
