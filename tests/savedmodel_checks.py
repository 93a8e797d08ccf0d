"""Checks on SavedModels that the model tests share, independent of tf_bnfuse."""

import numpy as np
import tensorflow as tf
from tensorflow.python.framework import convert_to_constants

import graphs

PLUMBING = {"Const", "Identity", "NoOp", "Placeholder", "StatefulPartitionedCall", "PartitionedCall",
            "ReadVariableOp", "VarHandleOp"}


def serving_graph_def(path, key="serving_default"):
    return tf.saved_model.load(path).signatures[key].graph.as_graph_def()


def data_path_ops(path):
    """Ops the serving signature runs, its functions included, minus plumbing."""
    graph_def = serving_graph_def(path)
    nodes = list(graph_def.node) + [n for f in graph_def.library.function for n in f.node_def]
    return [n.op for n in nodes if n.op not in PLUMBING]


def output_graph_def(path, key="serving_default"):
    """A folded SavedModel's serving graph, frozen by TensorFlow into one flat GraphDef.

    tf_bnfuse writes weights as variables, so the graph's constants are read
    back through TensorFlow's own freezing, not through tf_bnfuse's.
    """
    loaded = tf.saved_model.load(path)  # kept alive while freezing reads its variables
    graph_def = convert_to_constants.convert_variables_to_constants_v2(
        loaded.signatures[key]).graph.as_graph_def()
    assert all(n.op not in ("Conv2D", "MatMul") for f in graph_def.library.function for n in f.node_def)
    return graph_def


def batch_norm_like_left(path):
    """FusedBatchNorm ops, and Mul/Add by a constant right after a linear op, in a folded model."""
    graph_def = output_graph_def(path)
    fused = [n.name for n in graph_def.node if n.op.startswith("FusedBatchNorm")]
    return fused + graphs.affine_after_linear(graph_def)


def compare_outputs(original, folded, rtol=1e-4, batch=2, seed=11):
    """Runs both serving signatures on the same random input; max error within rtol of the output scale."""
    o = tf.saved_model.load(original).signatures["serving_default"]
    f = tf.saved_model.load(folded).signatures["serving_default"]
    inputs = {}
    rng = np.random.default_rng(seed)
    for key, spec in o.structured_input_signature[1].items():
        shape = [batch if d is None else d for d in spec.shape.as_list()]
        inputs[key] = rng.standard_normal(shape).astype(spec.dtype.as_numpy_dtype)
    expected, actual = o(**inputs), f(**inputs)
    assert sorted(expected) == sorted(actual)
    for name in expected:
        e, a = expected[name].numpy(), actual[name].numpy()
        assert e.shape == a.shape and e.dtype == a.dtype
        scale = np.abs(e).max()
        assert np.abs(a - e).max() <= rtol * scale + 1e-6, (name, np.abs(a - e).max(), scale)
