"""Writing the folded signatures as one TF2 SavedModel."""

import dataclasses
import hashlib
import os
import re
import threading

import numpy as np
import tensorflow as tf

from tf_bnfuse import errors
from tf_bnfuse import graph as graph_lib
from tf_bnfuse.graph import tf_internal
from tf_bnfuse.savedmodel import root_functions
from tf_bnfuse.savedmodel.folded_model import FoldedModel


# Float constants at least this big become variables of the written model:
# weights then live in variables/ (no 2 GB proto limit, one copy shared by all
# signatures) and load like any TF2 model's, instead of being baked into every
# function. Small and integer constants (shapes, axes) stay constants, because
# shape inference and some kernels need their values at graph build time.
MIN_VARIABLE_BYTES = 1024
_INIT_OP_KEY = "__saved_model_init_op"  # TF's constants.INIT_OP_SIGNATURE_KEY, which has no public name
_FLOAT_TYPES = {tf.float16.as_datatype_enum, tf.bfloat16.as_datatype_enum, tf.float32.as_datatype_enum,
                tf.float64.as_datatype_enum}


def _tensor_nbytes(tensor_proto):
    dtype = tf.as_dtype(tensor_proto.dtype)
    if tensor_proto.tensor_content:
        return len(tensor_proto.tensor_content)
    return tf.TensorShape(tensor_proto.tensor_shape).num_elements() * dtype.size


def _tensor_digest(tensor_proto):
    """A digest of a constant's dtype, shape and value, without copying a big tensor_content."""
    digest = hashlib.sha256(tensor_proto.tensor_shape.SerializeToString(deterministic=True))
    digest.update(str(tensor_proto.dtype).encode())
    if tensor_proto.tensor_content:
        digest.update(tensor_proto.tensor_content)
    else:
        digest.update(tensor_proto.SerializeToString(deterministic=True))
    return digest.digest()


def _variable_name(node_name):
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", node_name)


def _split_weights(graph_def, variables, store=None, release=False, own_variables=False, dedupe=True):
    """(graph_def with big float Consts turned into Placeholders, {node name: tf.Variable}).

    variables: a cache shared by all signatures, so equal weights are stored once:
    {(node name, content digest): tf.Variable}, and {("variable", id): tf.Variable} for a
    variable of the input that a stored Const stands for (store: the WeightStore its
    Consts name), which is written as it is, never copied here. release: drop each
    array from the store once its variable holds the value (nothing reads it again).
    own_variables: an input's variable is copied into a new one instead of written as it is.
    dedupe: other graphs share the cache, so folded weights are keyed by a digest of their bytes
    (one graph: by identity, and nothing is hashed; 2.9 GB of kernels take seconds to hash).
    """
    stripped = graph_lib.new_graph_def(graph_def)
    weights = {}
    for node in graph_def.node:
        tensor = node.attr["value"].tensor if node.op == "Const" else None
        stored = tensor is not None and graph_lib.WEIGHT_KEY_ATTR in node.attr
        variable = store.variable_of(node) if stored else None
        big_float = tensor is not None and tensor.dtype in _FLOAT_TYPES and (
            stored or _tensor_nbytes(tensor) >= MIN_VARIABLE_BYTES)
        if variable is None and not big_float:
            stripped.node.add().CopyFrom(node)
            if stored:  # a big integer constant a pass made: a constant again
                store.restore_node(stripped.node[-1])
            continue
        if variable is not None:  # of the input, or one a releasing store made for a fold
            digest = store.variable_digest(node) if dedupe else None
            key = ("variable", id(variable)) if digest is None else (node.name, digest)
            if key not in variables:
                # An in-memory fold's output owns its weights (the input may go on training): a copy
                # made by TensorFlow, not through numpy.
                variables[key] = (tf.Variable(variable.value(), trainable=False, name=_variable_name(node.name))
                                  if own_variables and digest is None else variable)
        else:
            array = store.array(node) if stored else None
            if stored and not dedupe:
                key = ("node", node.name)  # one graph: its node names are unique
            else:
                key = (node.name, (array.dtype.str, array.shape, hashlib.sha256(np.ascontiguousarray(array)).digest())
                       if stored else _tensor_digest(tensor))
            if key not in variables:
                value = array if stored else tf.make_ndarray(tensor)
                variables[key] = tf.Variable(value, trainable=False, name=_variable_name(node.name))
                if stored and release:
                    del value, array
                    store.release(node)
        weights[node.name] = variables[key]
        placeholder = stripped.node.add(name=node.name, op="Placeholder")
        placeholder.attr["dtype"].type = tensor.dtype
        placeholder.attr["shape"].shape.CopyFrom(tensor.tensor_shape)
    return stripped, weights


def _forwarded_tensor(index, tensor):
    """The tensor an output's Identity chain forwards ("name:port").

    The passes keep a signature output's own node, since the output is named
    by it; the written function names its outputs itself, so the Identity
    that freezing left there need not run. The walk stops before a
    placeholder: import would return it unfed instead of its input_map value.
    """
    def plain_identity(name):
        node = index.node(name)
        return node if node is not None and len(node.input) == 1 else None

    def placeholder_or_missing(input_str):
        source, _ = index.producer(input_str)
        return source is None or source.op == "Placeholder"

    forwarded = graph_lib.forwarded_input(tensor, plain_identity, ops=("Identity",), stop_before=placeholder_or_missing)
    node, port = index.producer(forwarded)
    return "%s:%d" % (node.name, port) if node is not None else tensor


# How TensorFlow names a function's captured inputs when it writes the function ("unknown",
# "unknown_0", ...), and so the names a frozen graph's captures have.
_CAPTURE_ARG_NAME = re.compile(r"unknown(_\d+)?$")


def _clear_of_capture_arg_names(graph_def, sig, weights):
    """(graph_def, sig, weights) with the nodes named like a written function's captured inputs
    renamed ("unknown_1" -> "unknown_1_frozen"). Writing the function names its captures so and
    renames the body nodes that clash, but a renamed node can take another's _output_shapes: the
    table-handle placeholder "unknown", renamed "unknown_1", was written with the [10, 8] of the
    embedding constant "unknown_1", and the output did not load."""
    new_names = {n.name: n.name + "_frozen" for n in graph_def.node if _CAPTURE_ARG_NAME.match(n.name)}
    if not new_names:
        return graph_def, sig, weights
    renamed = graph_lib.renamed_nodes(graph_def, new_names)

    def specs(table):
        return {k: dataclasses.replace(v, tensor=graph_lib.renamed_input(v.tensor, new_names)) for k, v in table.items()}
    sig = dataclasses.replace(sig, inputs=specs(sig.inputs), outputs=specs(sig.outputs),
                              resources={new_names.get(k, k): r for k, r in sig.resources.items()})
    return renamed, sig, {new_names.get(k, k): v for k, v in weights.items()}


_GRADIENT_TYPE_ATTR = "_gradient_op_type"  # what names a tf.custom_gradient's gradient (Keras 3's swish)


def _drop_custom_gradients(graph_def):
    """Removes the custom-gradient names from the nodes of graph_def (a copy split_weights made)
    and its library. The folded model is for inference, and tf.saved_model.save with default
    options would look for those gradient functions, which the import cut from their captures:
    "Found invalid capture ... when saving custom gradients" when a user saves a folded object."""
    nodes = list(graph_def.node) + [n for f in graph_def.library.function for n in f.node_def]
    for node in nodes:
        if _GRADIENT_TYPE_ATTR in node.attr:
            del node.attr[_GRADIENT_TYPE_ATTR]


def fed_placeholders(sig, weights):
    """The names of graph_def's placeholders that import_graph_def's input_map feeds: the
    signature's inputs, the weights and the kept resources."""
    return ({graph_lib.parse_input(v.tensor)[0] for v in sig.inputs.values()} | set(weights)
            | set(sig.resources))


def without_control_edges_from(graph_def, names):
    """graph_def, in place, with no control input from the nodes in `names`. input_map replaces data
    inputs only: a control edge from a fed placeholder would wait for the placeholder itself,
    unfed ("You must feed a value for placeholder tensor"). A restored tf.function, inlined,
    gives its captures' Identities one from its first argument; a variable's read, one from
    the weight. Neither orders anything once the value is fed."""
    for node in graph_def.node:
        control = graph_lib.control_inputs(node)
        if any(graph_lib.parse_input(i)[0] in names for i in control):
            graph_lib.set_inputs(node, graph_lib.data_inputs(node) + [
                i for i in control if graph_lib.parse_input(i)[0] not in names])
    return graph_def


def _signature_function(sig, graph_def, weights, name=None):
    """A wrapped function that imports the folded graph, feeding weights from variables
    and kept resources (written variables, tables) from the original objects."""
    graph_def, sig, weights = _clear_of_capture_arg_names(graph_def, sig, weights)
    _drop_custom_gradients(graph_def)
    without_control_edges_from(graph_def, fed_placeholders(sig, weights))
    input_keys = sorted(sig.inputs)
    output_keys = sorted(sig.outputs)
    returned = [_forwarded_tensor(graph_lib.GraphIndex(graph_def), sig.outputs[k].tensor) for k in output_keys]

    def call(*args):
        input_map = _input_map(sig, weights, {sig.inputs[k].tensor: arg for k, arg in zip(input_keys, args)})
        outputs = tf.graph_util.import_graph_def(
            graph_def, input_map=input_map, return_elements=returned, name="")
        # An output that is an input passed through, or is another output too, would alias
        # it; TF wants its own tensor there. Elsewhere an Identity would only add a node.
        inputs = {id(t) for t in input_map.values()}
        seen, result = set(), {}
        for k, t in zip(output_keys, outputs):
            result[k] = tf.identity(t) if id(t) in inputs or id(t) in seen or t.op.type == "Placeholder" else t
            seen.add(id(t))
        for k, tensor in result.items():
            # The SignatureDef shows the original's static shapes; shape inference through a
            # fed resource handle (a table lookup) can lose them.
            if sig.outputs[k].shape is not None:
                tensor.set_shape(sig.outputs[k].shape)
        return result

    specs = [tf.TensorSpec(sig.inputs[k].shape, sig.inputs[k].dtype, name=k) for k in input_keys]
    # wrap_function, not tf.function: the frozen graph carries the original's ordering of
    # stateful ops as control edges already, and tf.function's automatic control
    # dependencies would add an Identity per output on top (TF-TRT saves such functions too).
    function = tf.compat.v1.wrap_function(call, signature=specs)
    if name:
        # TFLiteConverter.from_concrete_functions keys each of several functions by its graph's
        # name; wrap_function would prefix it ("wrapped_function_<name>")
        function.graph.name = name
    # What a signature is called with; a wrapped function does not record it (TF-TRT sets the same).
    tf_internal.set_call_signature(function, input_keys)
    return function


def _input_map(sig, weights, fed):
    """import_graph_def's input_map: `fed` ({tensor: value}), the weights read from their
    variables and the kept resources from their original handles."""
    input_map = dict(fed)
    for name, variable in weights.items():
        input_map[name + ":0"] = variable.value()  # a bare ReadVariableOp (read_value adds an Identity)
    for name, resource in sig.resources.items():
        # Import cannot map a placeholder to an eager tensor: the function captures the
        # handle, and the capture's placeholder is what the graph reads.
        input_map[name + ":0"] = tf.compat.v1.get_default_graph().capture(resource.handle)
    return input_map


def signature_callable(sig):
    """A function that computes one folded signature in memory as the written model will, without
    writing it (keyword arguments, a dict of outputs); its weights are variables of its own."""
    return _signature_function(sig, *_split_weights(sig.graph_def, {}, sig.weights))


@dataclasses.dataclass
class MetaGraphToWrite:
    """One MetaGraph of the output: its tag set and folded signatures, with what they need at load."""
    tags: tuple
    signatures: dict  # key -> FrozenSignature
    initializers: list = dataclasses.field(default_factory=list)  # initializers_to_keep
    root_aliases: dict = dataclasses.field(default_factory=dict)  # root_functions.find's


def _signature_functions(signatures, variables, release, own_variables, dedupe):
    """({key: wrapped function}, {key: (GraphDef without weights, weights)}) of one MetaGraph's
    folded signatures; variables: the shared weight cache (dedupe: _split_weights')."""
    split = {}  # id(folded GraphDef) -> (its GraphDef without weights, weights); signatures may share one
    functions = {}
    written = {}  # what a function computes -> the function; signatures folded once share one
    for key, sig in signatures.items():
        if id(sig.graph_def) not in split:
            split[id(sig.graph_def)] = _split_weights(sig.graph_def, variables, sig.weights, release, own_variables,
                                                      dedupe)
        # Keras 3's "serve" and "serving_default" are one function: written once, the
        # SavedModel holds one copy of the graph, and loading and the first call cost half.
        same = (id(sig.graph_def), tuple(sorted((k, v.tensor) for k, v in sig.inputs.items())),
                tuple(sorted((k, v.tensor) for k, v in sig.outputs.items())), tuple(sorted(sig.resources)))
        if same not in written:
            written[same] = _signature_function(sig, *split[id(sig.graph_def)], name=key)
        functions[key] = written[same]
    return functions, {key: split[id(sig.graph_def)] for key, sig in signatures.items()}


def _saved_key(index, key):
    """The key a signature of the index-th MetaGraph is saved under: tf.saved_model.save writes one
    MetaGraph, so the keys of several are made distinct, then split off again (_split_metagraphs)."""
    return "__tf_bnfuse_metagraph_%d__%s" % (index, key)


@dataclasses.dataclass
class BuiltModel:
    """What build makes and save writes: the module, its signature functions, and each
    signature's GraphDef without weights beside the variables it reads them from (what
    probe_function runs, reading the very variables the output saves)."""
    module: FoldedModel
    saved: dict  # the key each signature is saved under -> its function
    metagraphs: list  # the MetaGraphToWrite list
    graphs: list  # per MetaGraph: {signature key: (GraphDef without weights, {node name: tf.Variable})}


def build(metagraphs, release_weights=False, own_variables=False):
    """The BuiltModel of folded MetaGraphs: one module whose signature functions import their
    folded GraphDefs; big float constants are variables, shared between signatures (of any
    MetaGraph) whose weights are equal. release_weights: the folded arrays leave the
    signatures' weight stores as they become variables (so a kernel is held once, not twice);
    the signatures cannot be built again. own_variables: the input's variables the folded
    graphs read unchanged are copied into the module's own (an in-memory fold; a written
    output saves them as they are)."""
    variables = {}
    saved, graphs, functions_of = {}, [], []
    dedupe = len({id(sig.graph_def) for m in metagraphs for sig in m.signatures.values()}) > 1
    for index, metagraph in enumerate(metagraphs):
        functions, split = _signature_functions(metagraph.signatures, variables, release_weights, own_variables,
                                                dedupe)
        graphs.append(split)
        functions_of.append(functions)
        saved.update(functions if len(metagraphs) == 1 else
                     {_saved_key(index, k): f for k, f in functions.items()})
    module = FoldedModel(functions_of[0])
    for metagraph, functions in zip(metagraphs, functions_of):
        if metagraph.root_aliases:
            root_functions.attach(module, metagraph.root_aliases, functions)
    module.weights = list(variables.values())  # tracked, so they are saved
    # Written variables and tables, with their initializers and assets.
    owners = {id(r.owner): r.owner for m in metagraphs for sig in m.signatures.values() for r in sig.resources.values()}
    module.kept_resources = list(owners.values())
    module.initializers = [i for m in metagraphs for i in m.initializers]
    return BuiltModel(module, saved, metagraphs, graphs)


def save(built, path):
    """Writes a BuiltModel as one TF2 SavedModel at `path` (which must not exist). Every MetaGraph
    of the output holds the whole object graph and function library, and its own tags and
    SignatureDefs; initializers (initializers_to_keep) run when the output loads."""
    # The folded model is for inference: the gradient functions of ops made
    # with tf.custom_gradient (Keras 3's swish) are not saved, and could not
    # be, since the import cut them from the captures they were traced with.
    options = tf.saved_model.SaveOptions(experimental_custom_gradients=False)
    try:
        tf.saved_model.save(built.module, path, signatures=built.saved, options=options)
    except (ValueError, TypeError) as e:
        raise errors.BnFuseError("cannot write the folded SavedModel: %s" % errors.first_line(e))
    if len(built.metagraphs) > 1 or sorted(built.metagraphs[0].tags) != ["serve"]:
        _split_metagraphs(path, built.metagraphs)


class SavingInBackground:
    """save(built, path) in a thread of its own, for the run's other work to go on meanwhile (the
    fold checks' compute beside the write's I/O and checksums). Leaving the `with` block waits for
    the save to end, so that an exception raised within it (a failed check, Ctrl-C) reaches the
    caller, which removes the scratch folder, with nothing writing into it any more; a signal's
    exception that arrives during that wait is raised once the save ended. wait() returns once
    the save is done, and raises what it raised."""

    def __init__(self, built, path):
        self._error = None
        self._thread = threading.Thread(target=self._save, args=(built, path), name="tf_bnfuse save", daemon=True)

    def _save(self, built, path):
        try:
            save(built, path)
        except BaseException as e:  # pylint: disable=broad-except  (raised again by wait, in the caller's thread)
            self._error = e

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc_info):
        signalled = None
        while self._thread.is_alive():
            try:
                self._thread.join()
            except BaseException as e:  # pylint: disable=broad-except  (Ctrl-C: raised once the save ended)
                signalled = e
        if signalled is not None:
            raise signalled
        return False

    def wait(self):
        self._thread.join()
        if self._error is not None:
            raise self._error


def write(metagraphs, path, release_weights=False):
    """build, then save: the folded MetaGraphs as one TF2 SavedModel at `path`."""
    save(build(metagraphs, release_weights), path)


def _split_metagraphs(path, metagraphs):
    """Turns the one MetaGraph tf.saved_model.save wrote (tagged "serve") into one per tag set.

    Each copy keeps its own signatures, under their own keys, in both the
    SignatureDefs (what TF Serving and saved_model_cli read) and the object
    graph's signature map (what tf.saved_model.load reads); the rest (graph,
    library, object graph, saver, init op) is shared and copied as it is.
    """
    pb_path = os.path.join(path, "saved_model.pb")
    proto = tf_internal.SavedModelProto()
    with open(pb_path, "rb") as f:
        proto.ParseFromString(f.read())
    written = type(proto.meta_graphs[0])()
    written.CopyFrom(proto.meta_graphs[0])
    del proto.meta_graphs[:]
    for index, metagraph in enumerate(metagraphs):
        renamed = ({k: k for k in metagraph.signatures} if len(metagraphs) == 1 else
                   {_saved_key(index, k): k for k in metagraph.signatures})
        copy = proto.meta_graphs.add()
        copy.CopyFrom(written)
        del copy.meta_info_def.tags[:]
        copy.meta_info_def.tags.extend(metagraph.tags)
        copy.signature_def.clear()
        for key, signature_def in written.signature_def.items():
            if key in renamed:
                copy.signature_def[renamed[key]].CopyFrom(signature_def)
        if _INIT_OP_KEY in written.signature_def and len(metagraphs) == 1:
            copy.signature_def[_INIT_OP_KEY].CopyFrom(written.signature_def[_INIT_OP_KEY])
        # With several MetaGraphs, tf.saved_model.load reads the output as TF1 (load_v1_in_v2),
        # which takes every SignatureDef for a signature and fails on the init op's unfed asset
        # placeholders. The init op is also in the TF1 main op collection (tf.saved_model.save
        # writes it there too), where that loader, TF Serving and the C++ loader look next.
        main_op = copy.collection_def[tf.compat.v1.saved_model.MAIN_OP_KEY].node_list.value
        if _INIT_OP_KEY in written.signature_def and len(metagraphs) > 1 and not main_op:
            main_op.append(written.signature_def[_INIT_OP_KEY].outputs[_INIT_OP_KEY].name.split(":")[0])
        nodes = copy.object_graph_def.nodes
        [signature_map] = [c.node_id for c in nodes[0].children if c.local_name == "signatures"]
        kept = []
        for child in nodes[signature_map].children:
            if child.local_name in renamed:
                kept.append(type(child)(node_id=child.node_id, local_name=renamed[child.local_name]))
        del nodes[signature_map].children[:]
        nodes[signature_map].children.extend(kept)
    with open(pb_path, "wb") as f:
        f.write(proto.SerializeToString())
