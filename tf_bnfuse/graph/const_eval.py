"""Evaluates small constant subgraphs with numpy instead of a TensorFlow session.

Building a tf.Graph and a Session costs about 100 us per node; numpy on the
few-element vectors of batch norm statistics costs a few us. Only ops whose
numpy form computes what the TF kernel computes (IEEE elementwise arithmetic,
the same broadcasting, reshapes) are listed, and only for dtypes where numpy
and TF do the same arithmetic; anything else returns None and the caller uses
TensorFlow.
"""

import numpy as np
import tensorflow as tf

from tf_bnfuse.graph import names

_FLOAT = (np.float32, np.float64)
_NUMERIC = _FLOAT + (np.int32, np.int64)

# op -> (function of the data inputs and the node, dtypes it may run on)
_ELEMENTWISE = {
    "Add": (np.add, _NUMERIC), "AddV2": (np.add, _NUMERIC), "Sub": (np.subtract, _NUMERIC),
    "Mul": (np.multiply, _NUMERIC), "RealDiv": (np.divide, _FLOAT), "Maximum": (np.maximum, _NUMERIC),
    "Minimum": (np.minimum, _NUMERIC), "Sqrt": (np.sqrt, _FLOAT), "Neg": (np.negative, _NUMERIC),
    "Reciprocal": (np.reciprocal, _FLOAT), "Square": (np.square, _NUMERIC),
    "Rsqrt": (lambda x: np.reciprocal(np.sqrt(x)), _FLOAT),
}


def _squeeze(node, x):
    axes = list(node.attr["squeeze_dims"].list.i)
    return np.squeeze(x, axis=tuple(a % x.ndim for a in axes)) if axes else np.squeeze(x)


def _apply(node, args):
    """The numpy value of one node, or None when it is not one numpy handles exactly."""
    if node.op in names.IDENTITY_OPS and node.op != "IdentityN" and len(args) == 1:
        return args[0]
    if node.op in _ELEMENTWISE:
        function, dtypes = _ELEMENTWISE[node.op]
        if any(a.dtype.type not in dtypes or a.dtype != args[0].dtype for a in args):
            return None
        return np.asarray(function(*args), dtype=args[0].dtype)
    if node.op == "Reshape" and len(args) == 2 and args[1].dtype.type in (np.int32, np.int64):
        return np.reshape(args[0], args[1].astype(np.int64))
    if node.op == "ExpandDims" and len(args) == 2 and args[1].size == 1:
        return np.expand_dims(args[0], int(args[1].reshape(())))
    if node.op == "Squeeze" and len(args) == 1:
        return _squeeze(node, args[0])
    return None


def evaluate(index, tensor):
    """The numpy value of `tensor` ("name:port"), or None if numpy cannot compute its cone.

    index: a graph.GraphIndex. Values are cached in its numpy_values across calls.
    """
    cache = index.numpy_values
    root, port, _ = names.parse_input(tensor)
    if port != 0:
        return None
    stack = [root]
    while stack:
        name = stack[-1]
        if name in cache:
            stack.pop()
            continue
        node = index.node(name)
        if node is None:
            return None
        if node.op == "Const":
            cache[name] = index.const_value(name)
            stack.pop()
            continue
        sources = []
        for input_str in node.input:
            source, source_port, is_control = names.parse_input(input_str)
            if is_control:
                continue
            if source_port != 0:
                return None
            sources.append(source)
        pending = [s for s in sources if s not in cache]
        if pending:
            if any(s in stack for s in pending):  # a cycle: not a constant subgraph
                return None
            stack.extend(pending)
            continue
        args = [cache[s] for s in sources]
        if any(a is None for a in args):
            value = None
        else:
            try:
                with np.errstate(all="ignore"):  # TF gives inf/nan silently too
                    value = _apply(node, args)
            except (ValueError, TypeError):
                value = None
        if value is not None and names.node_dtype(node) not in (None, tf.as_dtype(value.dtype)):
            value = None
        cache[name] = value
        stack.pop()
    return cache[root]
