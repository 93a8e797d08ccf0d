"""Freezing: each signature's ConcreteFunction to a GraphDef, its read-only variables as constants."""

import collections
import dataclasses
import hashlib
from typing import Dict, List, Optional

import tensorflow as tf

from tf_bnfuse import errors
from tf_bnfuse import graph as graph_lib
from tf_bnfuse.graph import tf_internal
from tf_bnfuse.savedmodel import resources


@dataclasses.dataclass
class TensorSpecInfo:
    """A signature input or output: its tensor in the frozen graph, dtype and shape."""
    tensor: str
    dtype: tf.DType
    shape: Optional[List[Optional[int]]]  # None: unknown rank


@dataclasses.dataclass
class KeptResource:
    """A capture freezing leaves alone: a written variable or a table, fed its original's handle."""
    handle: object  # the captured eager resource tensor
    owner: object  # the trackable that holds it (saved with the output, with its assets)


@dataclasses.dataclass
class FrozenSignature:
    key: str
    graph_def: object  # a GraphDef
    inputs: Dict[str, TensorSpecInfo]
    outputs: Dict[str, TensorSpecInfo]
    # placeholder name in graph_def -> the resource it stands for
    resources: Dict[str, KeptResource] = dataclasses.field(default_factory=dict)
    # The WeightStore that graph_def's stored Consts name (variables not yet read, folded arrays)
    weights: Optional[graph_lib.WeightStore] = None

    def release_graph_def(self):
        """Hands the GraphDef over, so that the caller's pipeline holds the only reference."""
        graph_def, self.graph_def = self.graph_def, None
        return graph_def

    @property
    def output_tensors(self):
        return [spec.tensor for spec in self.outputs.values()]


def select_signatures(loaded, keys, path, other_metagraph=None):
    """{key: ConcreteFunction} of the signatures named by keys (all of them without keys).

    other_metagraph: the tag set of a MetaGraph besides the --tags one; it keeps
    those of the named signatures it has, and must have one of them.
    """
    available = sorted(loaded.signatures.keys())
    where = path if other_metagraph is None else "%s (MetaGraph %s)" % (path, other_metagraph)
    if not available:
        raise errors.BadInputError("SavedModel %s has no signatures" % where)
    keys = list(keys) if keys else available
    if other_metagraph is not None and any(k in loaded.signatures for k in keys):
        keys = [k for k in keys if k in loaded.signatures]
    unknown = [k for k in keys if k not in loaded.signatures]
    if unknown:
        hint = "" if other_metagraph is None else " (or pass {--drop_other_metagraphs})"
        raise errors.BadInputError("SavedModel %s has no signature %s; available: %s%s" % (
            where, ", ".join(unknown), ", ".join(available), hint))
    return {k: loaded.signatures[k] for k in keys}


def signature_fingerprint(function):
    """A key equal for two signatures that compute the same thing from the same variables.

    Keras 3's model.export writes "serve" and "serving_default" as two
    signatures calling one function; freezing and folding it once is enough.
    Their graphs differ only in the _user_specified_name of capture
    placeholders, which names nothing the graph computes.
    """
    graph_def = function.graph.as_graph_def()
    for node in graph_def.node:
        if "_user_specified_name" in node.attr:
            del node.attr["_user_specified_name"]
    digest = hashlib.sha256(graph_def.SerializeToString(deterministic=True)).hexdigest()
    captures = tuple(id(t) for t in function.captured_inputs)  # the same variable objects
    return (digest, captures, repr(function.structured_input_signature), repr(function.structured_outputs))


def signature_inputs(function):
    """{input key: TensorSpecInfo} of a signature's ConcreteFunction.

    A signature's inputs and outputs are dicts; the function's own input list
    follows their flattening, which sorts by key.
    """
    input_keys = sorted(function.structured_input_signature[1])
    return {k: TensorSpecInfo(placeholder.name, function.structured_input_signature[1][k].dtype,
                              _shape_list(function.structured_input_signature[1][k].shape))
            for k, placeholder in zip(input_keys, function.inputs)}


def _shape_list(shape):
    return None if shape.rank is None else shape.as_list()


def _frozen(function, written, weights, shared, checkpoint):
    """(frozen GraphDef, output tensors): TensorFlow's freezing, except that big variables the
    graph only reads (every consumer a ReadVariableOp, once calls are inlined) are left to
    `weights`; freezing would copy each into a Const through numpy and protobuf. A TF1 model's
    reference variables, which TensorFlow freezes into Consts, go to `weights` too
    (_restored_consts_stored)."""
    graph_def, outputs = _frozen_reads_stored(function, written, weights, shared, checkpoint)
    return _restored_consts_stored(graph_def, weights, checkpoint), outputs


def _frozen_reads_stored(function, written, weights, shared, checkpoint):
    stored = _big_variables(function, written, weights.min_bytes)
    if not stored:
        return tf_internal.frozen_graph_def(function, written)
    try:
        graph_def, outputs = tf_internal.frozen_graph_def(function, written | set(stored))
    except ValueError:  # this TensorFlow's converter cannot leave variables out: it freezes them all
        return tf_internal.frozen_graph_def(function, written)
    only_read = _only_read(graph_def, stored)
    if len(only_read) < len(stored):  # the others (read in a call or loop body, gathered) frozen by TF
        graph_def, outputs = tf_internal.frozen_graph_def(function, written | only_read)
    return _reads_as_stored_consts(graph_def, {n: stored[n] for n in only_read}, weights, shared,
                                   checkpoint), outputs


def _restored_consts_stored(graph_def, weights, checkpoint):
    """graph_def with the Consts TensorFlow's freezing made of a TF1 model's reference variables
    held in `weights`, each with where the saver restored it from (a fold check reads a released
    one back); graph_def itself where there are none."""
    if checkpoint is None or not checkpoint.by_name:
        return graph_def
    return weights.strip(graph_def, sources=checkpoint.sources_by_name())


def _big_variables(function, written, min_bytes):
    """{capture placeholder name: tf.Variable} of the variables of at least min_bytes that the
    function captures and does not write."""
    by_handle = {id(v.handle): v for v in function.graph.variables}
    found = {}
    for outer, inner in function.graph.captures:
        variable = by_handle.get(id(outer))
        name = inner.op.name
        if variable is None or name in written or not variable.shape.is_fully_defined():
            continue
        if variable.shape.num_elements() * variable.dtype.size >= min_bytes and variable.dtype.is_numeric:
            found[name] = variable
    return found


def _resource_sources(graph_def, placeholders):
    """{node name: the placeholder it forwards} for the placeholders and the Identities that pass
    one on (inlining a call leaves one per argument)."""
    nodes = {n.name: n for n in graph_def.node}
    sources = {}
    for node in graph_def.node:
        if node.name in placeholders:
            sources[node.name] = node.name
        elif node.op == "Identity":
            source = graph_lib.parse_input(graph_lib.forwarded_input(node.name, nodes.get, ops=("Identity",)))[0]
            if source in placeholders:
                sources[node.name] = source
    return sources


def _only_read(graph_def, placeholders):
    """The names among `placeholders` whose value every data consumer in graph_def reads with a
    ReadVariableOp (through Identities)."""
    sources = _resource_sources(graph_def, placeholders)
    readers = {}
    for node in graph_def.node:
        if node.name in sources:
            continue  # an Identity passing one on
        for position, input_name in enumerate(graph_lib.data_inputs(node)):
            source = sources.get(graph_lib.parse_input(input_name)[0])
            if source is not None:
                readers.setdefault(source, set()).add(node.op == "ReadVariableOp" and position == 0)
    return {name for name in placeholders if readers.get(name) == {True}}


def _reads_as_stored_consts(graph_def, variables, weights, shared, checkpoint):
    """graph_def with each ReadVariableOp of these placeholders a Const that names its variable in
    `weights` (same name, dtype and shape; no value), and the placeholders (and the Identities
    that pass them on) gone. shared: ids of variables others read too (not releasable; None: all)."""
    keys = {name: weights.put_variable(variable, releasable=shared is not None and id(variable) not in shared,
                                       source=checkpoint.source(variable) if checkpoint is not None else None)
            for name, variable in variables.items()}
    sources = _resource_sources(graph_def, keys)
    frozen = graph_lib.new_graph_def(graph_def)
    for node in graph_def.node:
        if node.name in sources:
            continue
        data = graph_lib.data_inputs(node)
        control = [c for c in graph_lib.control_inputs(node) if c[1:] not in sources]
        source = sources.get(graph_lib.parse_input(data[0])[0]) if node.op == "ReadVariableOp" and data else None
        if source is None:
            new = frozen.node.add()
            new.CopyFrom(node)
            graph_lib.set_inputs(new, data + control)
            continue
        const = frozen.node.add(name=node.name, op="Const", device=node.device)
        graph_lib.set_inputs(const, control)
        const.attr["dtype"].type = node.attr["dtype"].type
        tensor = const.attr["value"].tensor
        tensor.dtype = node.attr["dtype"].type
        tensor.tensor_shape.CopyFrom(variables[source].shape.as_proto())
        const.attr[graph_lib.WEIGHT_KEY_ATTR].s = keys[source].encode()
    return frozen


def _kept_resources(key, function, graph_def, input_names, owners):
    """{placeholder name: KeptResource} for the captures freezing left as placeholders.

    Raises BadInputError naming a capture that is no resource of the
    SavedModel's object graph: the written model could not hold it.
    """
    outer_of = {inner.name.split(":")[0]: outer for outer, inner in function.graph.captures}
    kept = {}
    for node in graph_def.node:
        if node.op != "Placeholder" or node.name in input_names:
            continue
        outer = outer_of.get(node.name)
        owner = owners.get(id(outer)) if outer is not None else None
        if owner is None:
            raise errors.BadInputError(
                "signature %s reads %s, a %s that is not a variable or resource of the SavedModel's "
                "objects, so the output could not keep it" % (
                    key, node.name, tf.as_dtype(node.attr["dtype"].type).name))
        kept[node.name] = KeptResource(outer, owner)
    return kept


def written_handles(functions):
    """ids of the capture handles some of these functions write. Such a variable stays a variable
    in every signature, readers too: frozen there, a reader would not see what a writer wrote."""
    handles = set()
    for function in functions:
        written = resources.written_placeholders(function.graph.as_graph_def())
        handles |= {id(outer) for outer, inner in function.graph.captures if inner.op.name in written}
    return handles


def shared_variables(functions):
    """ids of the variables more than one of these functions captures."""
    counts = collections.Counter(i for function in functions for i in {id(v) for v in function.graph.variables})
    return {i for i, count in counts.items() if count > 1}


def freeze(key, function, owners, weights, written, shared=None, checkpoint=None):
    """Freezes a signature's ConcreteFunction into a FrozenSignature.

    Variables the signature only reads become constants; variables it writes
    and other resources (lookup tables) stay placeholders, recorded with the
    trackable in `owners` ({id(handle): trackable}, resources.resource_owners)
    that holds them. The caller keeps the loaded SavedModel alive meanwhile:
    freezing reads its variables, and the big ones the graph only reads are
    Consts naming the variable in `weights` (a WeightStore), read when a pass
    needs the value: no weight is copied by freezing. written: written_handles
    of every signature, this one included (those stay variables here). shared:
    ids of the variables something else of the run reads (shared_variables),
    which a releasing store must keep; None: all of them. checkpoint: the loaded variables'
    load.CheckpointKeys, from which a fold check reads a released one again (None: none is).
    """
    # The graph was read for its writes once, by written_handles.
    written = {inner.op.name for outer, inner in function.graph.captures if id(outer) in written}
    # A TF1 signature is pruned from the whole MetaGraph and keeps its table-initializer
    # collection, naming ops the pruning removed; Grappler refuses such a graph. The
    # tables are initialized by the objects that own them, not by this graph.
    function.graph.clear_collection(tf.compat.v1.GraphKeys.TABLE_INITIALIZERS)
    try:
        graph_def, output_tensors = _frozen(function, written, weights, shared, checkpoint)
    except Exception as e:
        raise errors.BadInputError("cannot freeze signature %s: %s" % (key, errors.first_line(e)))
    # A signature's inputs and outputs are dicts; the function's own input and
    # output lists follow their flattening, which sorts by key. (The restored
    # structured_outputs are TensorSpecs, not graph tensors, so position is all
    # there is to go by.)
    inputs = signature_inputs(function)
    output_keys = sorted(function.structured_outputs)
    if len(output_tensors) != len(output_keys):
        raise errors.BadInputError("signature %s: %d outputs but %d output keys" % (
            key, len(output_tensors), len(output_keys)))
    outputs = {}
    for output_key, tensor in zip(output_keys, output_tensors):
        outputs[output_key] = TensorSpecInfo(tensor.name, tensor.dtype, _shape_list(tensor.shape))
    kept = _kept_resources(key, function, graph_def, {t.tensor.split(":")[0] for t in inputs.values()}, owners)
    # Device pins from the exporting machine would stop the model running elsewhere.
    for node in graph_def.node:
        node.device = ""
    for function_def in graph_def.library.function:
        for node in function_def.node_def:
            node.device = ""
    return FrozenSignature(key, graph_def, inputs, outputs, kept, weights)
