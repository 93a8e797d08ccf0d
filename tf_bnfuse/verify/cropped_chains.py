"""Fold checks on the first rows: a fold's original chain computed on part of its input.

A chain that is one stride-1 NHWC Conv2D or depthwise convolution and per-channel steps after
it (a batch norm, a bias, a Mul or Add by a channel's or one value), in float32 or float64, is
computed on the first rows of its starting tensor only: the rows its first max(kernel height,
2) output rows read, its padding made explicit as the whole input has it, and those output rows
of the chain and of the folded graph are compared (verify/fold_plan.py adds them to the plan).
They hold every output channel and kernel tap, the top border and interior rows: what a fold
changes (a channel's scale, its bias, the kernel's layout) shows there; a fold changes no
padding or stride, and the output check compares every row. Half precision is compared in
full: its slope test needs the elements. On a big model the chains' convolutions are most of
the check's compute.
"""

import numpy as np
import tensorflow as tf

from tf_bnfuse import graph as graph_lib
from tf_bnfuse.graph import walks

# Ops after a cropped chain's convolution: each computes an element from the same element of
# its inputs, which broadcast along the rows (a channel's values, one value).
_ROW_WISE = frozenset(["Identity", "BiasAdd", "FusedBatchNorm", "FusedBatchNormV2", "FusedBatchNormV3", "Mul",
                       "Add", "AddV2", "Sub", "RealDiv", "Maximum", "Minimum", "Relu", "Relu6", "Rsqrt", "Sqrt",
                       "Reciprocal", "Neg", "Square"])
_CROPPED_LINEAR = ("Conv2D", "DepthwiseConv2dNative")


def _same_along_rows(shape):
    """Whether a value of this shape broadcasts along an NHWC tensor's rows: one value, a
    channel's, or of a shape whose row axis is 1 (Keras 3 reshapes a batch norm's parameters
    to [1, 1, 1, C])."""
    return shape is not None and (len(shape) < 3 or shape[-3] == 1)


def _nhwc(node):
    return (node.attr["data_format"].s if "data_format" in node.attr else b"NHWC") == b"NHWC"


def _constant_shape(name, chain, nodes, known):
    """The shape of a chain value computed from Consts alone (known: {name: shape}, filled in),
    followed through Reshape to a Const shape, Squeeze and _ROW_WISE ops; None for any other."""
    if name not in known:
        known[name] = _shape_computed(nodes.get(name), chain.get(name, []), chain, nodes, known)
    return known[name]


def _shape_computed(node, read, chain, nodes, known):
    """_constant_shape of one node, which reads `read`."""
    def shape_of(tensor):
        return _constant_shape(graph_lib.parse_input(tensor)[0], chain, nodes, known)
    if node is None:
        return None
    if node.op == "Const":
        return [d.size for d in node.attr["value"].tensor.tensor_shape.dim]
    if node.op == "Reshape" and len(read) == 2:
        target = nodes.get(graph_lib.parse_input(read[1])[0])
        if target is None or target.op != "Const":
            return None
        values = [int(v) for v in graph_lib.const_array(target)]
        return None if -1 in values else values
    if node.op == "Squeeze" and read:
        inner = shape_of(read[0])
        if not inner:
            return inner
        axes = {a % len(inner) for a in node.attr["squeeze_dims"].list.i}
        return [d for i, d in enumerate(inner) if not (d == 1 and (not axes or i in axes))]
    if node.op in _ROW_WISE:
        shapes = [shape_of(t) for t in read]
        try:
            return None if None in shapes else list(np.broadcast_shapes(*map(tuple, shapes)))
        except ValueError:
            return None
    return None


def crop(chain, original_nodes, dtype):
    """(the chain's convolution, its explicit paddings, the input rows it reads, the output rows
    compared) where a chain ({node: its data inputs}, fold_plan._chain's) may be computed on the
    first rows of its input (cropped), else None: one stride-1 NHWC Conv2D or depthwise
    convolution reading the chain's one input, the nodes below it _ROW_WISE, reading beside it
    values the same along the rows, in float32 or float64. original_nodes: {name: NodeDef} of
    the graph the chain is read from; read, not changed (a NodeDef's attr map adds what it is
    asked for)."""
    if tf.as_dtype(dtype) not in (tf.float32, tf.float64):
        return None
    nodes = {name: original_nodes[name] for name in chain}
    linear = [n for n in nodes.values() if n.op in _CROPPED_LINEAR]
    if len(linear) != 1 or len(chain[linear[0].name]) < 2:
        return None
    conv = linear[0]
    data, kernel = (graph_lib.canonical_tensor(t) for t in chain[conv.name][:2])
    readers = [name for name, read in chain.items() if data in map(graph_lib.canonical_tensor, read)]
    boundary = {graph_lib.canonical_tensor(i) for read in chain.values() for i in read
                if graph_lib.parse_input(i)[0] not in nodes}
    kernel_node = nodes.get(kernel[0])
    if (boundary != {data} or readers != [conv.name] or kernel_node is None or kernel_node.op != "Const"
            or not _nhwc(conv)):
        return None
    below_conv = walks.reachable([conv.name], _consumers_in(chain)) - {conv.name}
    known = {}
    for name in below_conv:  # row-wise, what they read beside the convolution the same along the rows
        beside = [graph_lib.parse_input(i)[0] for i in chain[name]]
        if nodes[name].op not in _ROW_WISE or not _nhwc(nodes[name]) or not all(
                _same_along_rows(_constant_shape(b, chain, nodes, known)) for b in beside
                if b not in below_conv and b != conv.name):
            return None
    strides = list(conv.attr["strides"].list.i) if "strides" in conv.attr else []
    dilations = list(conv.attr["dilations"].list.i) if "dilations" in conv.attr else [1, 1, 1, 1]
    padding = conv.attr["padding"].s if "padding" in conv.attr else b""
    shape = [d.size for d in kernel_node.attr["value"].tensor.tensor_shape.dim]
    if strides != [1, 1, 1, 1] or len(shape) != 4 or len(dilations) != 4 or padding not in (
            b"SAME", b"VALID", b"EXPLICIT"):
        return None
    height, width = ((shape[i] - 1) * dilations[i + 1] + 1 for i in (0, 1))
    if padding == b"EXPLICIT":
        paddings = list(conv.attr["explicit_paddings"].list.i)
    elif padding == b"SAME":
        paddings = [0, 0, (height - 1) // 2, height - 1 - (height - 1) // 2,
                    (width - 1) // 2, width - 1 - (width - 1) // 2, 0, 0]
    else:
        paddings = [0] * 8
    rows = max(height, 2)
    read_rows = rows + height - 1 - paddings[2]
    return (conv.name, paddings, read_rows, rows) if read_rows >= rows else None  # padding past the kernel


def _consumers_in(chain_inputs):
    """A function of a chain node's name to the chain's nodes that read it."""
    consumers = {}
    for name, read in chain_inputs.items():
        for source in {graph_lib.parse_input(i)[0] for i in read}:
            consumers.setdefault(source, []).append(name)
    return lambda name: consumers.get(name, [])


def cropped(chains, chain_prefix, rows, candidate, reference, dtype):
    """(candidate, reference) of a chain computed on the first rows of its input only (rows:
    crop's): its convolution in `chains`, named chain_prefix + its name, reads those rows,
    padded as the whole input is, and the first output rows of both are compared (below them
    the copy reads padding where the whole reads rows). An input of fewer rows is read whole:
    the chain's own result."""
    conv_name, paddings, read_rows, compared_rows = rows
    prefix = chain_prefix + "cropped/"
    conv = next(n for n in chains.node if n.name == chain_prefix + conv_name)

    def first_rows(name, tensor, count, tensor_dtype):
        # StridedSlice clamps the end: an input of fewer rows is read whole.
        chains.node.extend([
            graph_lib.const_node_def(name + "/begin", np.zeros(4, np.int32)),
            graph_lib.const_node_def(name + "/end", np.array([0, count, 0, 0], np.int32)),
            graph_lib.const_node_def(name + "/strides", np.ones(4, np.int32)),
            graph_lib.node_def(name, "StridedSlice", [tensor, name + "/begin", name + "/end", name + "/strides"],
                               {"T": tf.compat.v1.AttrValue(type=tensor_dtype), "Index": graph_lib.type_attr(tf.int32),
                                "end_mask": tf.compat.v1.AttrValue(i=0b1101)})])
        return name + ":0"
    conv.input[0] = first_rows(prefix + "input_rows", conv.input[0], read_rows, conv.attr["T"].type)
    conv.attr["padding"].s = b"EXPLICIT"
    conv.attr["explicit_paddings"].list.i[:] = paddings
    return (first_rows(prefix + "folded_rows", candidate, compared_rows, dtype),
            first_rows(prefix + "original_rows", reference, compared_rows, dtype))
