"""Tensor names, node inputs and attributes, and new GraphDefs: the vocabulary of the graph layer."""

import re

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


def stable_function_name(name):
    """A library function's name without the suffix freezing gives it ("_frozen_<n>"), which
    differs each time a function is frozen: what names a fold inside it across runs."""
    return re.sub(r"_frozen_\d+$", "", name)


def tensor_name(node_name, port=0):
    return node_name if port == 0 else "%s:%d" % (node_name, port)


def canonical_tensor(input_str):
    """'x' and 'x:0' name the same tensor; returns (name, port)."""
    name, port, _ = parse_input(input_str)
    return name, port


def is_control(input_str):
    return input_str.startswith("^")


def renamed_input(input_str, new_names):
    """input_str reading its node under new_names ({old name: new name}), port and control kept."""
    name, port, control = parse_input(input_str)
    if name not in new_names:
        return input_str
    return "^" + new_names[name] if control else tensor_name(new_names[name], port)


def renamed_nodes(graph_def, new_names):
    """A copy of graph_def whose nodes in new_names ({old name: new name}) have their new names,
    in every input and colocation (`_class: loc:@name`) that named them."""
    renamed = copy_graph_def(graph_def)
    located = {b"loc:@" + old.encode(): b"loc:@" + new.encode() for old, new in new_names.items()}
    for node in renamed.node:
        node.name = new_names.get(node.name, node.name)
        set_inputs(node, [renamed_input(i, new_names) for i in node.input])
        if "_class" in node.attr and any(e in located for e in node.attr["_class"].list.s):
            entries = [located.get(e, e) for e in node.attr["_class"].list.s]
            del node.attr["_class"].list.s[:]
            node.attr["_class"].list.s.extend(entries)
    return renamed


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


def new_graph_def(like, with_library=True):
    """An empty GraphDef with the versions and (with_library) the function library of `like`."""
    result = tf.compat.v1.GraphDef()
    result.versions.CopyFrom(like.versions)
    if with_library:
        result.library.CopyFrom(like.library)
    return result


def node_def(name, op, inputs, attrs=None):
    """A new NodeDef; attrs: {key: AttrValue}."""
    node = tf.compat.v1.NodeDef(name=name, op=op)
    node.input.extend(inputs)
    for key, value in (attrs or {}).items():
        node.attr[key].CopyFrom(value)
    return node


def const_node_def(name, value):
    """A new Const NodeDef holding a numpy value (in its proto)."""
    node = node_def(name, "Const", [], {"dtype": type_attr(value.dtype)})
    node.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(value))
    return node


def cast_node_def(name, tensor, source, destination):
    """A new Cast NodeDef of `tensor` from dtype `source` to `destination` (DTypes or DataType enums)."""
    return node_def(name, "Cast", [tensor], {"SrcT": type_attr(source), "DstT": type_attr(destination),
                                             "Truncate": tf.compat.v1.AttrValue(b=False)})


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
