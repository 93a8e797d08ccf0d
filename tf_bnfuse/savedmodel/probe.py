"""Probes: functions that compute a frozen or folded signature as written and return the values
of tensors inside it, in full or as a fixed sample of their elements (what verification
compares where a signature's outputs cannot show it: each fold's own check, the original
evaluated in float64)."""

import uuid
import weakref

import numpy as np
import tensorflow as tf

from tf_bnfuse import graph as graph_lib
from tf_bnfuse.graph import function_def as function_def_lib
from tf_bnfuse.graph import tf_internal
from tf_bnfuse.savedmodel import write


# How many elements of a probed tensor are kept (probe_function): enough that each of 2048 channels
# is seen about 8 times.
PROBE_SAMPLE_SIZE = 16384
# The flat positions sampled, i * a prime, reduced modulo the tensor's size at run time: the same
# elements of the same shape in every probe, whatever graph computes it; every element of a
# tensor of at most PROBE_SAMPLE_SIZE (the prime is invertible modulo its size), and a stride
# that is no multiple of a channel count in a bigger one.
_PROBE_POSITIONS = np.arange(PROBE_SAMPLE_SIZE, dtype=np.int64) * 1000003


def _read_nodes(prefix, dtypes, sampled, same_size):
    """(NodeDefs, {tensor: its sample's tensor}) reading PROBE_SAMPLE_SIZE elements of each
    tensor in `sampled` ({name: DataType}) at _PROBE_POSITIONS (the probe's argument prefix +
    "positions") modulo its size, which the run computes (nothing infers a probe's shapes before
    it runs: graph/function_def.py), once for tensors same_size pairs ({tensor: a tensor of
    its size})."""
    int32, int64 = graph_lib.type_attr(tf.int32), graph_lib.type_attr(tf.int64)
    flat_shape, zero = prefix + "flat_shape", prefix + "zero"
    nodes = [graph_lib.const_node_def(flat_shape, np.array([-1], np.int32)),
             graph_lib.const_node_def(zero, np.array(0, np.int32))]
    returned, positions = {}, {}
    for i, name in enumerate(sampled):
        at, dtype = "%ssampled_%d/" % (prefix, i), tf.compat.v1.AttrValue(type=dtypes[name])
        positions[name] = positions.get(same_size.get(name))
        if positions[name] is None:
            positions[name] = at + "positions"
            nodes.extend([
                graph_lib.node_def(at + "size", "Size", [name], {"T": dtype, "out_type": int64}),
                graph_lib.node_def(at + "positions", "FloorMod", [prefix + "positions", at + "size"], {"T": int64})])
        nodes.extend([
            graph_lib.node_def(at + "flat", "Reshape", [name, flat_shape], {"T": dtype, "Tshape": int32}),
            graph_lib.node_def(at + "sample", "GatherV2", [at + "flat", positions[name], zero],
                               {"Tparams": dtype, "Tindices": int64, "Taxis": int32,
                                "batch_dims": tf.compat.v1.AttrValue(i=0)})])
        returned[name] = at + "sample:0"
    return nodes, returned


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
        value = tf.convert_to_tensor(value) if isinstance(value, tf.Variable) else tf.constant(np.asarray(value))
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
    signature's inputs (in sorted key order), it returns {"full": {tensor: value}, "sampled":
    {tensor: value}}, computed on the device it is called on, with the process's optimizer
    options (verify/fold_check.run_as_written turns Grappler off)."""

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
        return {kind: {tensor: values[i] for tensor, i in self._returned[kind].items()} for kind in ("full", "sampled")}


def probe_function(sig, graph_def, weights, full, sampled, float64=False, checks=None,
                   same_size=None):
    """A Probe of the signature's graph: a function of its inputs (in sorted key order, of any
    shape) that returns {"full", "sampled"}: dicts of tensor name -> value of the tensors named
    in `full`, and of a fixed sample of the elements of those in `sampled` (_read_nodes). A
    tensor in neither graph is left out of the result.

    weights: {node name of graph_def: tf.Variable or array it reads} (write.build's graphs, or
    stored_weights). checks: (GraphDef, its weights) of nodes beside graph_def's, reading its
    tensors by name wherever they read a node they do not hold (the fold checks' original
    chains, verify/fold_check.py); `sampled` may name their tensors. same_size: {a sampled
    tensor: another of its size}, whose positions it shares (a fold beside its chain).
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
    sampled = [t for t in sampled if graph_lib.parse_input(t)[0] in present]
    prefix = "tf_bnfuse_probe_%s/" % suffix  # a name no graph node has
    read, samples = _read_nodes(prefix, function_def_lib.dtypes_of(graph_def, sampled), sampled,
                                   same_size or {})
    graph_def.node.extend(read)
    fed[prefix + "positions:0"] = tf.constant(_PROBE_POSITIONS)  # an argument: no node holds it
    fed.update({name + ":0": resource.handle for name, resource in sig.resources.items()})
    cast = [float64 and sig.inputs[k].dtype == tf.float32 for k in input_keys]
    arguments = ([(sig.inputs[k].tensor, (tf.float64 if c else sig.inputs[k].dtype).as_datatype_enum)
                  for k, c in zip(input_keys, cast)] + [(t, v.dtype.as_datatype_enum) for t, v in fed.items()])
    outputs = full + [samples[t] for t in sampled]
    function = function_def_lib.function_def(graph_def, "tf_bnfuse_probe_" + suffix, arguments, outputs)
    returned = {"full": {t: i for i, t in enumerate(full)},
                "sampled": {t: len(full) + i for i, t in enumerate(sampled)}}
    return Probe(function, graph_def.library.function, returned, list(fed.values()), cast)


def probe_callable(sig, full, sampled, float64=False):
    """probe_function of one frozen or folded signature, its weights read from the values its
    store holds (an input's variable is read as it is, not copied)."""
    return probe_function(sig, sig.graph_def, stored_weights(sig.graph_def, sig.weights), full, sampled, float64)
