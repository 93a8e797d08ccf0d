"""Tensor names, node inputs and attributes, and new GraphDefs: the vocabulary of the graph layer."""

import tensorflow as tf

# Ops that forward their (port-matching) input unchanged.
IDENTITY_OPS = frozenset({"Identity", "IdentityN", "Snapshot", "StopGradient"})


def parse_input(input_str):
    """'name:port' -> (name, port, False); '^name' -> (name, -1, True)."""
    if input_str.startswith("^"):
        return input_str[1:], -1, True
    name, sep, port = input_str.rpartition(":")
    if sep and port.isdigit():
        return name, int(port), False
    return input_str, 0, False


def tensor_name(node_name, port=0):
    return node_name if port == 0 else "%s:%d" % (node_name, port)


def canonical_tensor(input_str):
    """'x' and 'x:0' name the same tensor; returns (name, port)."""
    name, port, _ = parse_input(input_str)
    return name, port


def is_control(input_str):
    return input_str.startswith("^")


def data_inputs(node_or_inputs):
    """The data inputs (not '^name' control inputs) of a NodeDef, or of a list of input strings."""
    inputs = getattr(node_or_inputs, "input", node_or_inputs)
    return [i for i in inputs if not is_control(i)]


def control_inputs(node_or_inputs):
    """The '^name' control inputs of a NodeDef, or of a list of input strings."""
    inputs = getattr(node_or_inputs, "input", node_or_inputs)
    return [i for i in inputs if is_control(i)]


def data_positions(node):
    """The positions in node.input of its data inputs."""
    return [k for k, i in enumerate(node.input) if not is_control(i)]


def set_inputs(node, inputs):
    """Replaces a NodeDef's inputs (in place)."""
    del node.input[:]
    node.input.extend(inputs)


def new_graph_def(like):
    """An empty GraphDef with the versions and function library of `like`."""
    result = tf.compat.v1.GraphDef()
    result.versions.CopyFrom(like.versions)
    result.library.CopyFrom(like.library)
    return result


def copy_graph_def(graph_def):
    new = tf.compat.v1.GraphDef()
    new.CopyFrom(graph_def)
    return new


def type_attr(dtype):
    return tf.compat.v1.AttrValue(type=tf.as_dtype(dtype).as_datatype_enum)


def string_attr(value):
    return tf.compat.v1.AttrValue(s=value.encode() if isinstance(value, str) else value)


def attr_string(node, key, default=""):
    if key in node.attr:
        return node.attr[key].s.decode()
    return default


def node_dtype(node, key="T"):
    """The TF dtype of a node's type attr, or None."""
    if key in node.attr and node.attr[key].type:
        return tf.as_dtype(node.attr[key].type)
    return None
