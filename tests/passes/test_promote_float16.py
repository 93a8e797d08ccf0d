"""promote_float16 on a hand-built float16 graph: float32 compute, same signature dtypes and values."""

import numpy as np
import pytest
import tensorflow as tf

import graphs
from tf_bnfuse.passes import promote_float16
from tf_bnfuse.passes.context import PassContext

pytestmark = pytest.mark.quick  # the quick tier (scripts/test.sh --quick)


def test_float16_graph_computes_in_float32_and_keeps_its_input_and_output_dtypes():
    def build():
        x = tf.compat.v1.placeholder(tf.float16, [None, 6, 6, 3], name="x")
        y = tf.nn.conv2d(x, graphs.const(graphs.random((3, 3, 3, 4), np.float16), "w"), 1, "SAME", name="conv")
        y = tf.nn.relu(tf.nn.bias_add(y, graphs.const(graphs.random((4,), np.float16), "b")), name="out")
        side = tf.identity(y * tf.constant(2.0, tf.float16), name="side")  # reads the output op too
        return ["out", side.op.name]

    graph_def, outputs = graphs.build(build)
    before = graph_def.SerializeToString(deterministic=True)
    promoted, report = promote_float16.run(PassContext(), graph_def, outputs)
    assert graph_def.SerializeToString(deterministic=True) == before
    half = {n.name for n in promoted.node if promote_float16._has_half(n)}
    # Only the input placeholder, its Cast to float32 and the Casts back to float16 at the outputs
    # still name float16.
    assert half == {"x", "x/to_float32", "out", "side"} and {n.name: n.op for n in promoted.node}["out"] == "Cast"
    assert {n.op for n in promoted.node if n.name in half - {"x"}} == {"Cast"}
    feeds = {"x": graphs.random((2, 6, 6, 3), np.float16)}
    for e, a in zip(graphs.run(graph_def, feeds, outputs), graphs.run(promoted, feeds, outputs)):
        assert e.dtype == a.dtype == np.float16
        assert np.abs(a.astype(np.float64) - e.astype(np.float64)).max() <= 1e-2 * np.abs(e.astype(np.float64)).max()
    assert "promoted" in report.note
