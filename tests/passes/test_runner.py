"""What run_pipeline shares between passes: the GraphIndex of an unchanged graph, and the
weights it holds outside the proto while the passes run."""

import gc
import weakref

import pytest
import tensorflow as tf

import graphs
from tf_bnfuse import graph as graph_lib
from tf_bnfuse.graph import weights as weights_lib
from tf_bnfuse.passes.context import PassContext
from tf_bnfuse.passes import runner as pipeline

pytestmark = pytest.mark.quick  # the quick tier (scripts/test.sh --quick)


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
    assert PassContext().index(graph_def, outputs) is not PassContext().index(graph_def, outputs)  # one per context
    context = PassContext()
    first = context.index(graph_def, outputs)
    assert context.index(graph_def, outputs) is first
    assert context.index(graph_def, outputs[:0]) is not first  # other outputs: another index
    context.graph_changed()
    again = context.index(graph_def, outputs)
    assert again is not first
    kept = weakref.ref(again)
    del again, first
    pipeline.run_pipeline(graph_def, outputs, ["cleanup"], context=context)
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


def _loop_graph():
    """(graph_def, outputs): a while loop whose body has a conv + batch norm (fold_in_functions)."""
    import test_fold_in_functions
    return test_fold_in_functions.loop_graph(), ["out"]


def test_weights_held_outside_the_proto_give_the_same_graph_and_leave_nothing_behind(monkeypatch):
    for graph_def, outputs in [_conv_bn_graph(), _loop_graph()]:
        before = graph_def.SerializeToString(deterministic=True)
        monkeypatch.setattr(weights_lib, "STORED_MIN_BYTES", 1 << 40)
        plain, _ = pipeline.run_pipeline(graph_def, outputs, pipeline_default())
        monkeypatch.setattr(weights_lib, "STORED_MIN_BYTES", 1)
        stored, reports = pipeline.run_pipeline(graph_def, outputs, pipeline_default())
        assert any(r.folds for r in reports)
        assert stored.SerializeToString(deterministic=True) == plain.SerializeToString(deterministic=True)
        assert graph_def.SerializeToString(deterministic=True) == before  # the argument is untouched
        every_node = list(stored.node) + [n for f in stored.library.function for n in f.node_def]
        assert not [n.name for n in every_node if graph_lib.WEIGHT_KEY_ATTR in n.attr]


def pipeline_default():
    from tf_bnfuse import config
    return config.load_config(None)["pipeline"]
