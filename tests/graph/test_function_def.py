"""graph/function_def.py: a GraphDef made a FunctionDef from its protos computes what TensorFlow
computes tracing the same function, at outputs of list-valued and multi-output ops, through a
loop body of the library, reading its arguments in place of the tensors they stand for."""

import numpy as np
import pytest
import tensorflow as tf

from tf_bnfuse.graph import function_def as function_def_lib
from tf_bnfuse.graph import tf_internal

pytestmark = pytest.mark.quick  # the quick tier (scripts/test.sh --quick)

RNG = np.random.default_rng(5)


@tf.function(input_signature=[tf.TensorSpec([2, 4, 4, 6], tf.float32), tf.TensorSpec([6], tf.float32)])
def _traced(x, scale):
    y, mean, variance = tf.compat.v1.nn.fused_batch_norm(x, scale, tf.zeros([6]), is_training=True)[:3]
    first, second = tf.split(y, 2, axis=3)  # Split: a list output ("output", num_split of them)
    rows = tf.unstack(second, axis=0)  # Unpack: another
    doubled, halved = tf.identity_n([first * 2.0, rows[1] / 2.0])  # IdentityN: a type list
    values, positions = tf.unique(tf.cast(tf.reshape(x[0, 0, 0], [-1]) > 0, tf.int32))  # two dtypes
    total = tf.while_loop(lambda i, s: i < 3, lambda i, s: (i + 1, s * 1.5), (0, tf.reduce_sum(halved)))[1]
    return doubled, halved, mean, variance, values, positions, total, rows[0]


def test_a_converted_graph_computes_what_tensorflow_traced_at_every_kind_of_output():
    concrete = _traced.get_concrete_function()
    graph_def = concrete.graph.as_graph_def()
    assert all(t.op.type == "Identity" for t in concrete.outputs)  # what tf.function returns: Identities of
    outputs = [t.op.inputs[0].name for t in concrete.outputs]  # the tensors computed, read instead
    assert len([t for t in outputs if not t.endswith(":0")]) >= 4  # outputs past a node's first
    arguments = [(t.name, t.dtype.as_datatype_enum) for t in concrete.inputs]
    function = function_def_lib.function_def(graph_def, "tf_bnfuse_test_converted", arguments, outputs)
    assert not any(n.op == "Placeholder" for n in function.node_def)  # the arguments stand in for them
    tf_internal.register_functions(list(graph_def.library.function) + [function])
    try:
        x = tf.constant(RNG.standard_normal((2, 4, 4, 6)).astype(np.float32))
        scale = tf.constant(RNG.uniform(0.5, 1.5, 6).astype(np.float32))
        found = tf_internal.call_function("tf_bnfuse_test_converted", [x, scale], len(outputs))
    finally:
        tf_internal.remove_functions(["tf_bnfuse_test_converted"])
    expected = concrete(x, scale)
    assert len(found) == len(expected) == 8
    for got, want in zip(found, expected):
        assert got.dtype == want.dtype
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-6, atol=1e-6)
    dtypes = function_def_lib.dtypes_of(graph_def, outputs)
    assert [dtypes[t] for t in outputs] == [t.dtype.as_datatype_enum for t in concrete.outputs]
    assert {concrete.graph.get_tensor_by_name(t).op.type for t in outputs} >= {
        "IdentityN", "FusedBatchNormV3", "Unique", "Unpack"}
    assert any(n.op in ("While", "StatelessWhile") for n in graph_def.node) and graph_def.library.function


def test_an_argument_replaces_a_tensor_that_is_not_a_placeholder():
    @tf.function(input_signature=[tf.TensorSpec([3], tf.float32)])
    def f(x):
        y = tf.identity(x * 3.0, name="middle")
        return y + 1.0
    concrete = f.get_concrete_function()
    graph_def = concrete.graph.as_graph_def()
    middle = concrete.graph.get_operation_by_name("middle").outputs[0].name
    function = function_def_lib.function_def(graph_def, "tf_bnfuse_test_fed_middle",
                                             [(middle, tf.float32.as_datatype_enum)], [concrete.outputs[0].name])
    tf_internal.register_functions([function])
    try:
        [found] = tf_internal.call_function("tf_bnfuse_test_fed_middle", [tf.constant([1.0, 2.0, 4.0])], 1)
    finally:
        tf_internal.remove_functions(["tf_bnfuse_test_fed_middle"])
    np.testing.assert_allclose(found.numpy(), [2.0, 3.0, 5.0])  # middle fed, not computed from x
