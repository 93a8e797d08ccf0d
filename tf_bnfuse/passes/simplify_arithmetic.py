"""simplify_arithmetic: x * 1, x / 1, x + 0 and x - 0 by a constant become x.

Keras' and TF's swish is `x * sigmoid(beta * x)` with `beta = 1.0`: a Mul by
one after every activation (49 in EfficientNetB0), which also stops folds and
fills reports; Keras' Normalization layer with mean 0 and variance 1 is
`(x - zeros) / ones` with [1, 1, 1, C] constants. The node becomes Identity(x)
under its own name, so consumers and a signature output that names it are
unchanged (prune_identities then bypasses it).

Taken: a constant of the node's dtype that is exactly the identity element in
every entry, when its broadcast cannot change x's shape: a scalar always; a
constant of another shape when x's static shape, from TensorFlow's shape
inference on the frozen graph, has at least its rank and, on each of its axes
that is not 1, the same known size. `1 / x`, `0 - x`, and a constant that is not
exactly the identity element are left alone. (`x + 0` is x but for the sign of
a zero: -0 + 0 is +0, equal to -0.)
"""

import numpy as np
import tensorflow as tf

from tf_bnfuse import graph as graph_lib
from tf_bnfuse import report as report_lib

NAME = "simplify_arithmetic"
# A constant bigger than this is not read to see whether it is all ones or zeros (an identity
# element broadcast along x is small: Keras' Normalization has one per channel).
_MAX_CHECKED_ELEMENTS = 1 << 16
# op -> (identity element, positions the constant may take: x op c, and c op x for commutative ops)
_IDENTITY_ELEMENTS = {
    "Mul": (1, (0, 1)),
    "RealDiv": (1, (1,)),
    "Div": (1, (1,)),
    "Add": (0, (0, 1)),
    "AddV2": (0, (0, 1)),
    "Sub": (0, (1,)),
}


def _passed_input(index, node):
    """(the data input the node returns unchanged, when the constant broadcasts to x's shape,
    the constant's shape; () for a scalar), or None."""
    identity, positions = _IDENTITY_ELEMENTS[node.op]
    data = graph_lib.data_inputs(node)
    if len(data) != 2:
        return None
    dtype = graph_lib.node_dtype(node)
    for position in positions:
        const = index.const_node(data[position])
        other = data[1 - position]
        if const is None or index.const_node(other) is not None or graph_lib.node_dtype(const, "dtype") != dtype:
            continue
        if np.prod(index.const_shape(data[position]), dtype=np.int64) > _MAX_CHECKED_ELEMENTS:
            continue
        value = index.const_value(data[position])
        if np.all(value == identity):
            return other, tuple(np.shape(value))
    return None


def _broadcast_keeps_shape(x_shape, c_shape):
    """Whether x op c has x's shape for every x of this static shape (a tf.TensorShape)."""
    if x_shape.rank is None or x_shape.rank < len(c_shape):
        return False
    x_dims = x_shape.as_list()[x_shape.rank - len(c_shape):]
    return all(c == 1 or c == x for c, x in zip(c_shape, x_dims))


def _static_shapes(index, tensors):
    """{tensor: tf.TensorShape} from TensorFlow's shape inference on the graph. Imported without
    the weights' bytes: a Const held in the weight store is a Placeholder of its dtype and shape."""
    shell = graph_lib.new_graph_def(index.graph_def)
    for node in index.graph_def.node:
        if graph_lib.WEIGHT_KEY_ATTR in node.attr:
            tensor = node.attr["value"].tensor
            placeholder = shell.node.add(name=node.name, op="Placeholder")
            placeholder.attr["dtype"].type = tensor.dtype
            placeholder.attr["shape"].shape.CopyFrom(tensor.tensor_shape)
        else:
            shell.node.add().CopyFrom(node)
    graph = tf.Graph()
    try:
        with graph.as_default():
            tf.graph_util.import_graph_def(shell, name="")
    except (ValueError, TypeError, tf.errors.OpError):  # a graph TensorFlow cannot import here: no shapes
        return {}
    return {t: graph.get_tensor_by_name("%s:%d" % graph_lib.canonical_tensor(t)).shape for t in tensors}


def run(context, graph_def, outputs):
    index = context.index(graph_def, outputs)
    editor = context.editor(graph_def)
    report = report_lib.PassReport(NAME, nodes_before=len(graph_def.node))
    candidates = []  # (node, passed input, constant shape)
    for node in graph_def.node:
        if node.op in _IDENTITY_ELEMENTS and node.name in index.live:
            found = _passed_input(index, node)
            if found is not None:
                candidates.append((node,) + found)
    broadcasting = [passed for _, passed, shape in candidates if shape != ()]
    shapes = _static_shapes(index, broadcasting) if broadcasting else {}
    simplified = 0
    for node, passed, shape in candidates:
        if shape == () or (passed in shapes and _broadcast_keeps_shape(shapes[passed], shape)):
            editor.replace_node(node.name, "Identity", [passed], {"T": node.attr["T"]})
            simplified += 1
    report.nodes_after = len(editor.graph_def.node)
    report.note = "%d x*1, x/1, x+0, x-0 removed" % simplified
    return editor.graph_def, report
