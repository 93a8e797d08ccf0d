"""Synthetic frozen graphs of any size, for timing the passes alone.

A graph is a chain of blocks on one input, alternating two batch norm forms:
- Conv2D -> BiasAdd -> FusedBatchNormV3 -> Relu (10 nodes), as tf-keras freezes;
- Conv2D -> BiasAdd -> Mul -> AddV2 -> Relu with scale and offset computed
  from the statistics by Rsqrt/Mul/Sub (18 nodes), as Keras 3 freezes.
Every block folds, so the passes do all their work on every block.
"""

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import graph_pb2

CHANNELS = 4
FUSED_BLOCK_NODES = 10
KERAS3_BLOCK_NODES = 18


def _const(graph_def, name, value):
    node = graph_def.node.add(name=name, op="Const")
    node.attr["dtype"].type = tf.float32.as_datatype_enum
    node.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(np.asarray(value, np.float32)))
    return name


def _op(graph_def, name, op, inputs, **attrs):
    node = graph_def.node.add(name=name, op=op)
    node.input.extend(inputs)
    node.attr["T"].type = tf.float32.as_datatype_enum
    for key, value in attrs.items():
        if isinstance(value, bool):
            node.attr[key].b = value
        elif isinstance(value, float):
            node.attr[key].f = value
        elif isinstance(value, bytes):
            node.attr[key].s = value
        elif isinstance(value, list):
            node.attr[key].list.i.extend(value)
    return name


def _conv_bias(graph_def, rng, prefix, x):
    c = CHANNELS
    kernel = _const(graph_def, prefix + "/kernel", rng.standard_normal((1, 1, c, c)))
    conv = _op(graph_def, prefix + "/conv", "Conv2D", [x, kernel], strides=[1, 1, 1, 1], padding=b"SAME",
               data_format=b"NHWC")
    bias = _const(graph_def, prefix + "/bias", rng.standard_normal(c))
    return _op(graph_def, prefix + "/bias_add", "BiasAdd", [conv, bias], data_format=b"NHWC")


def _fused_block(graph_def, rng, prefix, x):
    c = CHANNELS
    y = _conv_bias(graph_def, rng, prefix, x)
    params = [_const(graph_def, prefix + "/" + n, v) for n, v in (
        ("gamma", rng.uniform(0.5, 1.5, c)), ("beta", rng.standard_normal(c)),
        ("mean", rng.standard_normal(c)), ("variance", rng.uniform(0.5, 2.0, c)))]
    bn = _op(graph_def, prefix + "/bn", "FusedBatchNormV3", [y] + params, epsilon=1e-3, is_training=False,
             data_format=b"NHWC")
    graph_def.node[-1].attr["U"].type = tf.float32.as_datatype_enum
    return _op(graph_def, prefix + "/relu", "Relu", [bn])


def _keras3_block(graph_def, rng, prefix, x):
    c = CHANNELS
    y = _conv_bias(graph_def, rng, prefix, x)
    gamma = _const(graph_def, prefix + "/gamma", rng.uniform(0.5, 1.5, c))
    beta = _const(graph_def, prefix + "/beta", rng.standard_normal(c))
    mean = _const(graph_def, prefix + "/mean", rng.standard_normal(c))
    variance = _const(graph_def, prefix + "/variance", rng.uniform(0.5, 2.0, c))
    eps = _const(graph_def, prefix + "/eps", 1e-3)
    rsqrt = _op(graph_def, prefix + "/rsqrt", "Rsqrt", [_op(graph_def, prefix + "/var_eps", "AddV2",
                                                            [variance, eps])])
    scale = _op(graph_def, prefix + "/scale", "Mul", [gamma, rsqrt])
    offset = _op(graph_def, prefix + "/offset", "Sub", [beta, _op(graph_def, prefix + "/mean_scale", "Mul",
                                                                   [mean, scale])])
    scaled = _op(graph_def, prefix + "/mul", "Mul", [y, scale])
    shifted = _op(graph_def, prefix + "/add", "AddV2", [scaled, offset])
    return _op(graph_def, prefix + "/relu", "Relu", [shifted])


def chain_graph(target_nodes, seed=0):
    """(GraphDef of about target_nodes nodes, output tensor names, number of batch norms)."""
    rng = np.random.default_rng(seed)
    graph_def = graph_pb2.GraphDef()
    x = graph_def.node.add(name="input", op="Placeholder")
    x.attr["dtype"].type = tf.float32.as_datatype_enum
    x.attr["shape"].shape.CopyFrom(tf.TensorShape([1, 8, 8, CHANNELS]).as_proto())
    current, blocks = "input", 0
    while len(graph_def.node) < target_nodes:
        block = _fused_block if blocks % 2 == 0 else _keras3_block
        current = block(graph_def, rng, "block%d" % blocks, current)
        blocks += 1
    output = _op(graph_def, "output", "Identity", [current])
    return graph_def, [output], blocks
