"""A float64 copy of a graph's float32 arithmetic: the near-exact answer that verification measures
a deep model's own float32 rounding against (verify/compare.py)."""

import numpy as np
import tensorflow as tf

from tf_bnfuse.graph import names

_FLOAT = tf.float32.as_datatype_enum
_DOUBLE = tf.float64.as_datatype_enum
_BATCH_NORMS = ("FusedBatchNorm", "FusedBatchNormV2", "FusedBatchNormV3")
# Ops that hold or touch state: their dtypes are the resource's, which a copy cannot change.
_STATEFUL_MARKS = ("Variable", "Table", "Iterator", "Stack", "TensorArray", "Queue")


def in_float64(graph_def):
    """A copy of graph_def that computes in float64 wherever it computes in float32 (its float32
    Consts, Placeholders and op types), inference batch norms written as arithmetic (TensorFlow
    has no float64 FusedBatchNorm kernel); None where that cannot be written: a library function,
    state, a training-mode batch norm or one whose other outputs are read."""
    if graph_def.library.function:
        return None
    read_ports = {(name, port) for node in graph_def.node for name, port, control in map(names.parse_input, node.input)
                  if not control}
    result = names.new_graph_def(graph_def)
    for node in graph_def.node:
        if any(mark in node.op for mark in _STATEFUL_MARKS):
            return None
        if node.op in _BATCH_NORMS:
            lowered = _lowered_batch_norm(node, read_ports)
            if lowered is None:
                return None
            result.node.extend(lowered)
            continue
        copy = result.node.add()
        copy.CopyFrom(node)
        _to_double(copy)
    return result


def _to_double(node):
    for key, attr in node.attr.items():
        if attr.type == _FLOAT:
            attr.type = _DOUBLE
        if any(t == _FLOAT for t in attr.list.type):
            attr.list.type[:] = [_DOUBLE if t == _FLOAT else t for t in attr.list.type]
        if key == "value" and attr.tensor.dtype == _FLOAT:
            attr.tensor.CopyFrom(tf.make_tensor_proto(tf.make_ndarray(attr.tensor).astype(np.float64)))


def _lowered_batch_norm(node, read_ports):
    """y = (x - mean) * (scale * rsqrt(variance + epsilon)) + offset, in float64, under the batch
    norm's name; None for a training-mode one or one whose other outputs are read."""
    if node.attr["is_training"].b or any((node.name, p) in read_ports for p in range(1, 6)):
        return None
    x, scale, offset, mean, variance = names.data_inputs(node)[:5]
    data_format = names.attr_string(node, "data_format", "NHWC")
    made = []

    def add(op, suffix, inputs, **attrs):
        new = names.node_def(node.name + "/float64_" + suffix if suffix else node.name, op, inputs)
        new.attr["T"].type = _DOUBLE
        for key, value in attrs.items():
            new.attr[key].CopyFrom(value)
        made.append(new)
        return new.name

    def channel_vector(input_str, suffix):  # broadcast along the channel axis of NCHW/NCDHW
        if not data_format.startswith("NC"):
            return input_str
        shape = names.const_node_def(node.name + "/float64_shape_" + suffix,
                                     np.array([-1] + [1] * (len(data_format) - 2), np.int32))
        made.append(shape)
        return add("Reshape", suffix + "_per_channel", [input_str, shape.name],
                   Tshape=tf.compat.v1.AttrValue(type=tf.int32.as_datatype_enum))

    epsilon = names.const_node_def(node.name + "/float64_epsilon", np.array(node.attr["epsilon"].f, np.float64))
    made.append(epsilon)
    rsqrt = add("Rsqrt", "rsqrt", [add("AddV2", "variance_epsilon", [variance, epsilon.name])])
    multiplier = channel_vector(add("Mul", "multiplier", [scale, rsqrt]), "multiplier")
    centered = add("Sub", "centered", [x, channel_vector(mean, "mean")])
    add("AddV2", "", [add("Mul", "scaled", [centered, multiplier]), channel_vector(offset, "offset")])
    return made
