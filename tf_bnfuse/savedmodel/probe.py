"""Probes: functions that compute a frozen or folded signature as written and return the values
of tensors inside it, in full or as a fixed sample of their elements (what verification
compares where a signature's outputs cannot show it: each fold's own check, the original
evaluated in float64)."""

import uuid

import numpy as np
import tensorflow as tf

from tf_bnfuse import graph as graph_lib
from tf_bnfuse.savedmodel import write


# How many elements of a probed tensor are kept (probe_function): enough that each of 2048 channels
# is seen about 8 times.
PROBE_SAMPLE_SIZE = 16384
# The flat positions sampled, i * a prime, reduced modulo the tensor's size at run time: the same
# elements of the same shape in every probe, whatever graph computes it; every element of a
# tensor of at most PROBE_SAMPLE_SIZE (the prime is invertible modulo its size), and a stride
# that is no multiple of a channel count in a bigger one.
_PROBE_POSITIONS = np.arange(PROBE_SAMPLE_SIZE, dtype=np.int64) * 1000003


def _read_nodes(graph_def, probed, full, sampled):
    """(GraphDef, {"full": {tensor: its node}, "sampled": {...}}, {placeholder: array to capture}):
    nodes, added to a graph in one import (building a probe op by op was most of its cost), that
    read the probed tensors ({name: tf.Tensor}): an Identity of each in `full`, and
    PROBE_SAMPLE_SIZE elements of each in `sampled` at _PROBE_POSITIONS modulo its size: a
    constant of positions for each static size, else computed at run time (max(size, 1): no
    tf.cond)."""
    prefix = "tf_bnfuse_probe_%s/" % uuid.uuid4().hex[:12]  # a name no graph node has
    read = graph_lib.new_graph_def(graph_def, with_library=False)
    int32, int64 = graph_lib.type_attr(tf.int32), graph_lib.type_attr(tf.int64)
    flat_shape, zero = prefix + "flat_shape", prefix + "zero"
    read.node.extend([graph_lib.const_node_def(flat_shape, np.array([-1], np.int32)),
                      graph_lib.const_node_def(zero, np.array(0, np.int32))])
    # placeholder tensor -> its value: importing a big Const formats its value (a miss of `_class`)
    captured = {}

    def const(name, value):
        if prefix + name + ":0" not in captured:
            captured[prefix + name + ":0"] = value
            read.node.extend([_placeholder(prefix + name, graph_lib.type_attr(value.dtype))])
        return prefix + name

    def positions(at, flat, tensor):
        size = tensor.shape.num_elements()
        if size is not None:
            return const("positions_%d" % size, _PROBE_POSITIONS % max(size, 1))
        read.node.extend([
            graph_lib.node_def(at + "size", "Size", [flat], {"T": graph_lib.type_attr(tensor.dtype),
                                                             "out_type": int64}),
            graph_lib.node_def(at + "nonzero_size", "Maximum", [at + "size", const("one", np.array(1, np.int64))],
                               {"T": int64}),
            graph_lib.node_def(at + "positions", "FloorMod",
                               [const("positions", _PROBE_POSITIONS), at + "nonzero_size"], {"T": int64})])
        return at + "positions"

    returned = {"full": {}, "sampled": {}}
    for i, name in enumerate(full):
        returned["full"][name] = "%sfull_%d" % (prefix, i)
        read.node.extend([graph_lib.node_def(returned["full"][name], "Identity", [_port_name(name)],
                                             {"T": graph_lib.type_attr(probed[name].dtype)})])
    for i, name in enumerate(sampled):
        at, dtype = "%ssampled_%d/" % (prefix, i), graph_lib.type_attr(probed[name].dtype)
        read.node.extend([graph_lib.node_def(at + "flat", "Reshape", [_port_name(name), flat_shape],
                                             {"T": dtype, "Tshape": int32})])
        read.node.extend([graph_lib.node_def(at + "sample", "GatherV2",
                                             [at + "flat", positions(at, at + "flat", probed[name]), zero],
                                             {"Tparams": dtype, "Tindices": int64, "Taxis": int32,
                                              "batch_dims": tf.compat.v1.AttrValue(i=0)})])
        returned["sampled"][name] = at + "sample"
    return read, returned, captured


def _import(graph, graph_def, input_map, captured, return_elements=None):
    """import_graph_def into the probe's graph, each placeholder in `captured` ({tensor: resource
    handle, eager tensor or array}) fed that value, which the function captures."""
    with tf.init_scope():  # eager
        values = {name: value if tf.is_tensor(value) else tf.constant(value) for name, value in captured.items()}
    input_map = dict(input_map, **{name: graph.capture(value) for name, value in values.items()})
    return tf.graph_util.import_graph_def(graph_def, input_map=input_map, return_elements=return_elements, name="")


def _port_name(tensor):
    return "%s:%d" % graph_lib.canonical_tensor(tensor)


def _placeholder(name, dtype_attr):
    return graph_lib.node_def(name, "Placeholder", [], {"dtype": dtype_attr})


def _reading_weights(graph_def, weights):
    """(a copy of graph_def whose nodes named in `weights` ({name: tf.Variable or array}) read
    that value, {placeholder tensor: the value to capture}). A variable's node becomes a
    ReadVariableOp of a resource placeholder (cast where graph_def wants another dtype: a float64
    copy), an array's a placeholder: nodes imported in one go, where a read made op by op cost
    a probe most of its time."""
    result = graph_lib.new_graph_def(graph_def)
    captured = {}
    for node in graph_def.node:
        value = weights.get(node.name)
        if value is None:
            result.node.add().CopyFrom(node)
            continue
        dtype = tf.as_dtype(node.attr["dtype"].type)
        if not isinstance(value, tf.Variable):
            result.node.extend([_placeholder(node.name, node.attr["dtype"])])
            captured[node.name + ":0"] = np.asarray(value, dtype.as_numpy_dtype)
            continue
        handle, read = node.name + "/tf_bnfuse_handle", node.name + "/tf_bnfuse_read"
        result.node.extend([_placeholder(handle, graph_lib.type_attr(tf.resource))])
        captured[handle + ":0"] = value.handle
        if value.dtype == dtype:
            read = node.name
        result.node.extend([graph_lib.node_def(read, "ReadVariableOp", [handle],
                                               {"dtype": graph_lib.type_attr(value.dtype)})])
        if read != node.name:
            result.node.extend([graph_lib.node_def(node.name, "Cast", [read], {
                "SrcT": graph_lib.type_attr(value.dtype), "DstT": graph_lib.type_attr(dtype)})])
    return result, captured


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


def probe_function(sig, graph_def, weights, input_shapes, full, sampled, float64=False, checks=None):
    """A function of the signature's inputs (in sorted key order, of input_shapes) that returns
    {"full", "sampled"}: dicts of tensor name -> value of the tensors named in `full`, and of a
    fixed sample of the elements of those in `sampled` (_read_nodes). A tensor in neither graph
    is left out of the result.

    weights: {node name of graph_def: tf.Variable or array it reads} (write.build's graphs, or
    stored_weights). checks: (GraphDef, its weights) of nodes imported after graph_def, reading
    its tensors by name wherever they read a node they do not hold (the fold checks' original
    chains, verify/fold_check.py); `sampled` may name their tensors. float64: computed in
    float64 where graph_def computes in float32 (graph_lib.in_float64; the float32 inputs and
    weights cast on the way in); None where that cannot be written.
    """
    input_keys = sorted(sig.inputs)
    if float64:
        graph_def = None if sig.resources else graph_lib.in_float64(_as_placeholders(graph_def, weights))
        if graph_def is None:
            return None
    # Its own names for the library's functions: the original's and the folded graph's loop
    # bodies share names, not bodies, and a process registers a function name once. (A copy.)
    renamed = graph_lib.renamed_functions(graph_def, "_probe_%s" % uuid.uuid4().hex[:12])
    graph_def = write.without_control_edges_from(renamed, write.fed_placeholders(sig, weights))
    graph_def, captured = _reading_weights(graph_def, weights)
    check_def = None
    if checks is not None:
        check_def, check_captured = _reading_weights(
            graph_lib.renamed_functions(checks[0], "_check_%s" % uuid.uuid4().hex[:12]), checks[1])
    present = {n.name for n in graph_def.node} | ({n.name for n in check_def.node} if check_def is not None else set())
    full = [t for t in full if graph_lib.parse_input(t)[0] in present]
    sampled = [t for t in sampled if graph_lib.parse_input(t)[0] in present]

    def call(*args):
        graph = tf.compat.v1.get_default_graph()
        inputs = {sig.inputs[k].tensor: tf.cast(arg, tf.float64) if float64 and arg.dtype == tf.float32 else arg
                  for k, arg in zip(input_keys, args)}
        _import(graph, graph_def, inputs, dict(captured, **{n + ":0": r.handle for n, r in sig.resources.items()}))

        def tensor(name):
            node, port, _ = graph_lib.parse_input(name)
            found = graph.get_operation_by_name(node)
            # A signature input's placeholder stays in the graph, unfed: its readers read the argument
            mapped = inputs.get("%s:%d" % (node, port))
            return mapped if found.type == "Placeholder" and mapped is not None else found.outputs[port]
        if check_def is not None:
            made = {n.name for n in check_def.node}
            read = {_port_name(i): tensor(i) for n in check_def.node for i in graph_lib.data_inputs(n)
                    if graph_lib.parse_input(i)[0] not in made}
            _import(graph, check_def, read, check_captured)
        probed = {t: tensor(t) for t in full + sampled}
        read_def, returned, constants = _read_nodes(graph_def, probed, full, sampled)
        names = [name for kind in ("full", "sampled") for name in returned[kind].values()]
        found = dict(zip(names, _import(graph, read_def, {_port_name(t): v for t, v in probed.items()}, constants,
                                        [n + ":0" for n in names])))
        return {kind: {t: found[name] for t, name in returned[kind].items()} for kind in ("full", "sampled")}

    # Placeholder names no graph node has: import renames a graph node that clashes with one.
    specs = [tf.TensorSpec(input_shapes[k], sig.inputs[k].dtype, name="tf_bnfuse_probe_input_%d" % i)
             for i, k in enumerate(input_keys)]
    return tf.compat.v1.wrap_function(call, signature=specs)


def probe_callable(sig, input_shapes, full, sampled, float64=False):
    """probe_function of one frozen or folded signature, its weights read from the values its
    store holds (an input's variable is read as it is, not copied)."""
    return probe_function(sig, sig.graph_def, stored_weights(sig.graph_def, sig.weights), input_shapes, full, sampled,
                          float64)
