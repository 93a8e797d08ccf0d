"""The GraphIndex the pipeline shares between passes that leave the graph as it is."""

import gc
import weakref

import tensorflow as tf

import graphs
from tf_bnfuse import graph as graph_lib
from tf_bnfuse import pipeline


def _conv_bn_graph():
    """(graph_def, outputs): conv -> batch norm -> relu, which fold_batch_norm folds."""
    def build():
        x = tf.compat.v1.placeholder(tf.float32, [None, 8, 8, 3], name="x")
        conv = tf.nn.conv2d(x, graphs.const(graphs.random((3, 3, 3, 4)), "w"), 1, "SAME", name="conv")
        bn = graphs.fused_batch_norm(conv, 4, "bn")
        tf.nn.relu(bn[0], name="out")
    return graphs.build(build)[0], ["out"]


def test_the_index_is_shared_only_while_the_graph_is_unchanged_and_dropped_after():
    graph_def, outputs = _conv_bn_graph()
    assert graph_lib.index_of(graph_def, outputs) is not graph_lib.index_of(graph_def, outputs)  # not shared outside
    with graph_lib.sharing_indexes() as shared:
        first = graph_lib.index_of(graph_def, outputs)
        assert graph_lib.index_of(graph_def, outputs) is first
        assert graph_lib.index_of(graph_def, outputs[:0]) is not first  # other outputs: another index
        shared.forget()
        again = graph_lib.index_of(graph_def, outputs)
        assert again is not first
        kept = weakref.ref(again)
    del again
    gc.collect()
    assert kept() is None, "the shared index outlived the pipeline"


def test_a_pipeline_with_passes_that_change_nothing_gives_what_a_fresh_index_gives():
    graph_def, outputs = _conv_bn_graph()
    shared, _ = pipeline.run_pipeline(graph_def, outputs, ["simplify_arithmetic", "fold_forward", "fold_batch_norm",
                                                           "cleanup"])
    alone = graph_def
    for name in ["simplify_arithmetic", "fold_forward", "fold_batch_norm", "cleanup"]:
        alone, _ = pipeline.run_pipeline(alone, outputs, [name])
    assert shared.SerializeToString(deterministic=True) == alone.SerializeToString(deterministic=True)
    assert "FusedBatchNormV3" not in [n.op for n in shared.node]  # the fold happened
