"""Probes: functions that compute a frozen or folded signature as written and return the values
of tensors inside it, in full, or how far pairs of them are apart, computed in the graph over
every element (what verification compares where a signature's outputs cannot show it: each
fold's own check, the original evaluated in float64)."""

import uuid
import weakref

import numpy as np
import tensorflow as tf

from tf_bnfuse import graph as graph_lib
from tf_bnfuse.graph import function_def as function_def_lib
from tf_bnfuse.graph import tf_internal
from tf_bnfuse.savedmodel import write


def _compare_nodes(prefix, dtypes, compared, moments=()):
    """(NodeDefs, {(reference, candidate): tensor [max |reference - candidate|, max |reference|]})
    comparing each pair of tensors in `compared` over every element, in the graph: the
    difference and the reference stacked (a candidate that is neither of the reference's shape
    nor broadcasts to it fails the run), flattened, and reduced. A pair in `moments` adds, in
    float32, [sum d * r, sum r * r, sum d * d, elements] of the difference d and the reference
    r, each centred on its mean over all but the last axis (a channel's): what the least-squares
    slope of d on r and its standard error need, where a fold's scale error shows under rounding
    noise even when a channel's bias dominates it (_moment_nodes). TensorFlow's Max returns NaN
    where an element is NaN, and -inf over no element. dtypes: the references' {name: DataType}."""
    two_rows, axis = prefix + "two_rows", prefix + "axis"
    nodes = [graph_lib.const_node_def(two_rows, np.array([2, -1], np.int32)),
             graph_lib.const_node_def(axis, np.array(1, np.int32))]
    int32 = graph_lib.type_attr(tf.int32)
    returned = {}
    for i, (reference, candidate) in enumerate(compared):
        at, dtype = "%scompared_%d/" % (prefix, i), tf.compat.v1.AttrValue(type=dtypes[reference])
        nodes.extend([
            graph_lib.node_def(at + "difference", "Sub", [reference, candidate], {"T": dtype}),
            graph_lib.node_def(at + "stacked", "Pack", [at + "difference", reference],
                               {"T": dtype, "N": tf.compat.v1.AttrValue(i=2), "axis": tf.compat.v1.AttrValue(i=0)}),
            graph_lib.node_def(at + "rows", "Reshape", [at + "stacked", two_rows], {"T": dtype, "Tshape": int32}),
            graph_lib.node_def(at + "magnitudes", "Abs", [at + "rows"], {"T": dtype}),
            graph_lib.node_def(at + "maxima", "Max", [at + "magnitudes", axis],
                               {"T": dtype, "Tidx": int32, "keep_dims": tf.compat.v1.AttrValue(b=False)})])
        returned[(reference, candidate)] = at + "maxima:0"
        if (reference, candidate) in moments:
            nodes.extend(_moment_nodes(at, reference, dtype))
            returned[(reference, candidate)] = at + "found:0"
    return nodes, returned


def _moment_nodes(at, reference, dtype):
    """The nodes of a pair's [max |d|, max |r|, sum d * r, sum r * r, sum d * d, elements] in
    float32 (at + "found"), d and r centred on their channels' means, from its "stacked" [d, r]
    and "maxima" (_compare_nodes)."""
    int32, wide = graph_lib.type_attr(tf.int32), graph_lib.type_attr(tf.float32)
    no_keep, keep = tf.compat.v1.AttrValue(b=False), tf.compat.v1.AttrValue(b=True)

    def const(name, value):
        return graph_lib.const_node_def(at + name, np.array(value, np.int32))
    return [
        # [2, elements, channels]: the channel count from the reference's last dimension
        graph_lib.node_def(at + "shape", "Shape", [reference], {"T": dtype, "out_type": int32}),
        const("last_begin", [-1]), const("last_end", [0]), const("last_stride", [1]),
        graph_lib.node_def(at + "channels", "StridedSlice",
                           [at + "shape", at + "last_begin", at + "last_end", at + "last_stride"],
                           {"T": int32, "Index": int32, "end_mask": tf.compat.v1.AttrValue(i=1)}),
        const("two_rows_of", [2, -1]), const("zero", 0),
        graph_lib.node_def(at + "channel_rows_shape", "ConcatV2", [at + "two_rows_of", at + "channels", at + "zero"],
                           {"T": int32, "N": tf.compat.v1.AttrValue(i=2), "Tidx": int32}),
        graph_lib.cast_node_def(at + "wide", at + "stacked", dtype.type, tf.float32),
        graph_lib.node_def(at + "channel_rows", "Reshape", [at + "wide", at + "channel_rows_shape"],
                           {"T": wide, "Tshape": int32}),
        const("one", 1),
        graph_lib.node_def(at + "channel_means", "Mean", [at + "channel_rows", at + "one"],
                           {"T": wide, "Tidx": int32, "keep_dims": keep}),
        graph_lib.node_def(at + "centred", "Sub", [at + "channel_rows", at + "channel_means"], {"T": wide}),
        graph_lib.node_def(at + "centred_reference", "GatherV2", [at + "centred", at + "one", at + "zero"],
                           {"Tparams": wide, "Tindices": int32, "Taxis": int32,
                            "batch_dims": tf.compat.v1.AttrValue(i=0)}),
        graph_lib.node_def(at + "centred_difference", "GatherV2", [at + "centred", at + "zero", at + "zero"],
                           {"Tparams": wide, "Tindices": int32, "Taxis": int32,
                            "batch_dims": tf.compat.v1.AttrValue(i=0)}),
        # [d * r, r * r, d * d]: the reference row times both rows, then the difference squared
        graph_lib.node_def(at + "by_reference", "Mul", [at + "centred", at + "centred_reference"], {"T": wide}),
        graph_lib.node_def(at + "squared_difference", "Square", [at + "centred_difference"], {"T": wide}),
        graph_lib.node_def(at + "squared_difference_row", "ExpandDims", [at + "squared_difference", at + "zero"],
                           {"T": wide, "Tdim": int32}),
        graph_lib.node_def(at + "products", "ConcatV2", [at + "by_reference", at + "squared_difference_row",
                                                         at + "zero"],
                           {"T": wide, "N": tf.compat.v1.AttrValue(i=2), "Tidx": int32}),
        const("element_axes", [1, 2]),
        graph_lib.node_def(at + "sums", "Sum", [at + "products", at + "element_axes"],
                           {"T": wide, "Tidx": int32, "keep_dims": no_keep}),
        graph_lib.node_def(at + "size", "Size", [reference], {"T": dtype, "out_type": int32}),
        graph_lib.cast_node_def(at + "wide_size", at + "size", tf.int32, tf.float32),
        graph_lib.node_def(at + "count", "Reshape", [at + "wide_size", at + "last_stride"],
                           {"T": wide, "Tshape": int32}),
        graph_lib.cast_node_def(at + "wide_maxima", at + "maxima", dtype.type, tf.float32),
        graph_lib.node_def(at + "found", "ConcatV2", [at + "wide_maxima", at + "sums", at + "count", at + "zero"],
                           {"T": wide, "N": tf.compat.v1.AttrValue(i=3), "Tidx": int32})]


def _placeholder(name, dtype_attr):
    return graph_lib.node_def(name, "Placeholder", [], {"dtype": dtype_attr})


def _fed_weights(graph_def, weights):
    """{tensor: the value fed for it} of graph_def's nodes named in `weights` ({name: tf.Variable
    or array}): a variable's value as it is (a read shares its buffer), an array as a constant,
    cast where graph_def wants another dtype (a float64 copy). function_def leaves their nodes
    out: nothing copies the graph for them."""
    fed = {}
    for node in graph_def.node:
        value = weights.get(node.name)
        if value is None:
            continue
        dtype = tf.as_dtype(node.attr["dtype"].type)
        # The raw read: a third of convert_to_tensor's Python, on a hundred variables a probe.
        value = (tf.raw_ops.ReadVariableOp(resource=value.handle, dtype=value.dtype)
                 if isinstance(value, tf.Variable) else tf.constant(np.asarray(value)))
        fed[node.name + ":0"] = value if value.dtype == dtype else tf.cast(value, dtype)
    return fed


def stored_weights(graph_def, store):
    """{node name: the input's variable, or the array}: the stored Consts of graph_def, which
    probe_function reads from their values in the store (a variable as it is, not copied)."""
    weights = {}
    for node in graph_def.node:
        if node.op == "Const" and graph_lib.WEIGHT_KEY_ATTR in node.attr:
            variable = store.variable_of(node)
            weights[node.name] = store.array(node) if variable is None else variable
    return weights


def _as_placeholders(graph_def, names):
    """A copy of graph_def whose nodes in `names` are Placeholders of their dtype."""
    result = graph_lib.new_graph_def(graph_def)
    for node in graph_def.node:
        if node.name in names:
            result.node.extend([_placeholder(node.name, node.attr["dtype"])])
        else:
            result.node.add().CopyFrom(node)
    return result


class Probe:
    """A probe function, registered with TensorFlow while this object lives: called with a
    signature's inputs (in sorted key order), it returns {"full": {tensor: value}, "compared":
    {(reference, candidate): [max abs difference, scale]}} (_compare_nodes), computed on the
    device it is called on, with the process's optimizer options (verify/fold_check.run_as_written
    turns Grappler off)."""

    def __init__(self, function, library, returned, fed, cast_to_float64):
        tf_internal.register_functions(list(library) + [function])
        self._finalizer = weakref.finalize(self, tf_internal.remove_functions,
                                           [function.signature.name] + [f.signature.name for f in library])
        self._name, self._returned, self._fed = function.signature.name, returned, fed
        self._types = [arg.type for arg in function.signature.output_arg]
        self._cast_to_float64 = cast_to_float64

    def __call__(self, *inputs):
        inputs = [tf.cast(x, tf.float64) if cast else x for x, cast in zip(inputs, self._cast_to_float64)]
        values = tf_internal.call_function(self._name, inputs + self._fed, len(self._types))
        return {"full": {tensor: values[i] for tensor, i in self._returned["full"].items()},
                "compared": {pair: values[i] for pair, i in self._returned["compared"].items()}}


def probe_function(sig, graph_def, weights, full, compared=(), float64=False, checks=None, moments=()):
    """A Probe of the signature's graph: a function of its inputs (in sorted key order, of any
    shape) that returns {"full": {tensor name: value} of the tensors named in `full`,
    "compared": {(reference, candidate): [max |reference - candidate|, max |reference|]} of the
    pairs of tensor names in `compared`, over every element, followed for a pair in `moments`
    by the sums its slope is fitted from (_compare_nodes)}. A tensor in
    neither graph is left out of the result, and so is a pair that names one.

    weights: {node name of graph_def: tf.Variable or array it reads} (write.build's graphs, or
    stored_weights). checks: (GraphDef, its weights) of nodes beside graph_def's, reading its
    tensors by name wherever they read a node they do not hold (the fold checks' original
    chains, verify/fold_check.py); `full` and `compared` may name their tensors.
    float64: computed in float64 where graph_def computes in float32 (graph_lib.in_float64; the
    float32 inputs and weights cast on the way in); None where that cannot be written.
    """
    input_keys = sorted(sig.inputs)
    if float64:
        graph_def = None if sig.resources else graph_lib.in_float64(_as_placeholders(graph_def, weights))
        if graph_def is None:
            return None
    # Its own names for the library's functions: the original's and the folded graph's loop
    # bodies share names, not bodies, and a process registers a function name once. (A copy.)
    suffix = uuid.uuid4().hex[:12]
    graph_def = write.without_control_edges_from(graph_lib.renamed_functions(graph_def, "_probe_" + suffix),
                                                 write.fed_placeholders(sig, weights))
    fed = _fed_weights(graph_def, weights)
    if checks is not None:
        check_def = graph_lib.renamed_functions(checks[0], "_check_" + suffix)
        graph_def.node.extend(check_def.node)
        graph_def.library.function.extend(check_def.library.function)
        fed.update(_fed_weights(check_def, checks[1]))
    present = {n.name for n in graph_def.node}
    full = [t for t in full if graph_lib.parse_input(t)[0] in present]
    compared = [pair for pair in compared if all(graph_lib.parse_input(t)[0] in present for t in pair)]
    prefix = "tf_bnfuse_probe_%s/" % suffix  # a name no graph node has
    comparisons, compared_outputs = _compare_nodes(
        prefix, function_def_lib.dtypes_of(graph_def, [reference for reference, _ in compared]), compared,
        frozenset(moments))
    graph_def.node.extend(comparisons)
    fed.update({name + ":0": resource.handle for name, resource in sig.resources.items()})
    cast = [float64 and sig.inputs[k].dtype == tf.float32 for k in input_keys]
    arguments = ([(sig.inputs[k].tensor, (tf.float64 if c else sig.inputs[k].dtype).as_datatype_enum)
                  for k, c in zip(input_keys, cast)] + [(t, v.dtype.as_datatype_enum) for t, v in fed.items()])
    outputs = full + [compared_outputs[pair] for pair in compared]
    function = function_def_lib.function_def(graph_def, "tf_bnfuse_probe_" + suffix, arguments, outputs)
    returned = {"full": {t: i for i, t in enumerate(full)},
                "compared": {pair: len(full) + i for i, pair in enumerate(compared)}}
    return Probe(function, graph_def.library.function, returned, list(fed.values()), cast)


def probe_callable(sig, full, compared=(), float64=False):
    """probe_function of one frozen or folded signature, its weights read from the values its
    store holds (an input's variable is read as it is, not copied)."""
    return probe_function(sig, sig.graph_def, stored_weights(sig.graph_def, sig.weights), full, compared, float64)
