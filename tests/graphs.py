"""Builders for small hand-made GraphDefs, and a runner that executes one.

Every batch norm gets random, non-trivial statistics so that each fold changes
the kernel.
"""

import numpy as np
import tensorflow as tf

RNG = np.random.default_rng(1234)


def bn_params(channels, rng=RNG, dtype=np.float32):
    gamma = rng.uniform(0.5, 1.5, channels).astype(dtype)
    beta = rng.normal(0, 0.5, channels).astype(dtype)
    mean = rng.normal(0, 0.5, channels).astype(dtype)
    variance = rng.uniform(0.2, 2.0, channels).astype(dtype)
    return gamma, beta, mean, variance


def fused_batch_norm(x, channels, name, version="V3", data_format="NHWC", is_training=False,
                     params=None, epsilon=1e-3, param_dtype=np.float32):
    """A FusedBatchNorm{,V2,V3} node on x with constant random parameters."""
    gamma, beta, mean, variance = params or bn_params(channels, dtype=param_dtype)
    consts = [tf.constant(v, name="%s/%s" % (name, n))
              for v, n in zip((gamma, beta, mean, variance), ("gamma", "beta", "mean", "variance"))]
    if is_training:  # training mode takes empty mean/variance
        consts[2] = tf.constant([], dtype=param_dtype, name=name + "/empty_mean")
        consts[3] = tf.constant([], dtype=param_dtype, name=name + "/empty_var")
    op = {"": tf.raw_ops.FusedBatchNorm, "V2": tf.raw_ops.FusedBatchNormV2,
          "V3": tf.raw_ops.FusedBatchNormV3}[version]
    return op(x=x, scale=consts[0], offset=consts[1], mean=consts[2], variance=consts[3],
              epsilon=epsilon, data_format=data_format, is_training=is_training, name=name)


def const(value, name):
    return tf.constant(value, name=name)


def random(shape, dtype=np.float32, rng=RNG):
    return rng.standard_normal(shape).astype(dtype)


def build(fn):
    """Runs fn() in a fresh graph; returns (graph_def, fn's return value)."""
    graph = tf.Graph()
    with graph.as_default():
        result = fn()
    return graph.as_graph_def(), result


def run(graph_def, feeds, fetches):
    """Executes a GraphDef: feeds {placeholder name: array}, fetches [tensor names]."""
    graph = tf.Graph()
    with graph.as_default():
        tf.compat.v1.import_graph_def(graph_def, name="")
    fetch_tensors = [graph.get_tensor_by_name(f if ":" in f else f + ":0") for f in fetches]
    feed_dict = {graph.get_tensor_by_name(k + ":0"): v for k, v in feeds.items()}
    with tf.compat.v1.Session(graph=graph) as session:
        return session.run(fetch_tensors, feed_dict)


def op_counts(graph_def):
    counts = {}
    for node in graph_def.node:
        counts[node.op] = counts.get(node.op, 0) + 1
    return counts


def batch_norm_nodes(graph_def):
    return [n.name for n in graph_def.node if n.op.startswith("FusedBatchNorm")]
