"""SavedModel I/O: load, freeze each signature to a GraphDef, write a new SavedModel."""

import dataclasses
import hashlib
import os
import re
import sys
from typing import Dict, List, Optional

import tensorflow as tf
from tensorflow.core.framework import graph_pb2
from google.protobuf import message
from google.protobuf import text_format
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow.python.checkpoint import checkpoint_options
from tensorflow.python.framework import convert_to_constants
from tensorflow.python.framework import ops
from tensorflow.python.saved_model import load as tf_load
from tensorflow.python.saved_model import loader_impl

from tf_bnfuse import errors
from tf_bnfuse.savedmodel.preflight import check_saved_model_dir
from tf_bnfuse import graph as graph_lib
from tf_bnfuse.savedmodel import resources
from tf_bnfuse.savedmodel import root_functions


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
    graph_def: graph_pb2.GraphDef
    inputs: Dict[str, TensorSpecInfo]
    outputs: Dict[str, TensorSpecInfo]
    # placeholder name in graph_def -> the resource it stands for
    resources: Dict[str, KeptResource] = dataclasses.field(default_factory=dict)

    def release_graph_def(self):
        """Hands the GraphDef over, so that the caller's pipeline holds the only reference."""
        graph_def, self.graph_def = self.graph_def, None
        return graph_def

    @property
    def output_tensors(self):
        return [spec.tensor for spec in self.outputs.values()]


def _first_line(exc):
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def read_tag_sets(path):
    """The tag sets of the MetaGraphs in saved_model.pb; BadInputError if it does not parse."""
    pb_path = os.path.join(path, "saved_model.pb")
    proto = saved_model_pb2.SavedModel()
    try:
        if os.path.isfile(pb_path):
            with open(pb_path, "rb") as f:
                proto.ParseFromString(f.read())
        else:
            with open(os.path.join(path, "saved_model.pbtxt")) as f:
                text_format.Parse(f.read(), proto)
    except (message.DecodeError, text_format.ParseError, UnicodeDecodeError) as e:
        raise errors.BadInputError("%s: saved_model.pb is corrupt or truncated (%s)" % (path, _first_line(e)))
    if not proto.meta_graphs:
        raise errors.BadInputError("%s: saved_model.pb holds no MetaGraph" % path)
    return [sorted(m.meta_info_def.tags) for m in proto.meta_graphs]


def check_tags(path, tags):
    tag_sets = read_tag_sets(path)
    if tags and sorted(tags) not in tag_sets:
        raise errors.BadInputError("SavedModel %s has no MetaGraph with tags %s; available tag sets: %s" % (
            path, ",".join(tags), "; ".join(",".join(t) or "(none)" for t in tag_sets)))


def load(path, tags):
    check_saved_model_dir(path)
    check_tags(path, tags)
    try:
        try:
            loaded = _load_without_unreferenced_functions(path, tags)
        except Exception:  # pylint: disable=broad-except
            loaded = None  # TF's own load below gives the error, or the object, as the user would get it
        if loaded is None:
            loaded = tf.saved_model.load(path, tags=list(tags) if tags else None)
        return loaded
    except Exception as e:  # TF raises many types here; all mean the same to the user.
        raise errors.BadInputError("cannot load SavedModel %s with tags %s: %s" % (
            path, ",".join(tags or []), _first_line(e)))


def _functions_the_object_graph_calls(meta_graph):
    """Names of the library functions the object graph's concrete functions call, directly or
    through calls inside them (by op type or func attr), with every gradient function and
    every function with an api_implements attr (Grappler's implementation selector calls
    those by that attr: tf-keras' cuDNN LSTM and GRU)."""
    library = {f.signature.name: f for f in meta_graph.graph_def.library.function}
    pending = list(meta_graph.object_graph_def.concrete_functions)
    pending += [name for name, f in library.items() if "api_implements" in f.attr]
    pending += [g.gradient_func for g in meta_graph.graph_def.library.gradient]
    pending += [g.gradient_func for g in meta_graph.graph_def.library.registered_gradients]
    called = set()
    while pending:
        name = pending.pop()
        if name in called or name not in library:
            continue
        called.add(name)
        for node in library[name].node_def:
            pending.append(node.op)  # a function called by its own name
            pending.extend(graph_lib.called_function_names(node))
    return called


def _load_without_unreferenced_functions(path, tags):
    """tf.saved_model.load of a TF2 SavedModel, minus the library functions no object calls.

    tf.saved_model.save writes its checkpoint's save and restore functions
    (__inference__traced_save/_restore, one op per variable) into the library,
    where only the MetaGraph's saver nodes call them; TF's loader imports every
    library function into a graph all the same, and restores the variables
    from the checkpoint without them. On Keras 3 MobileNetV2 they are 3,167 of
    the library's 3,997 nodes, and leaving them out takes the load from 1.0 to
    0.6 s. Uses TF's own Loader on the pruned proto (what load_partial does);
    None where that does not apply (a TF1 model, nothing to leave out).
    """
    if sys.byteorder != "little":  # TF byte-swaps function constants first; left to TF's load
        return None
    proto, debug_info = loader_impl.parse_saved_model_with_debug_info(path)
    if len(proto.meta_graphs) != 1 or not proto.meta_graphs[0].HasField("object_graph_def"):
        return None
    meta_graph = proto.meta_graphs[0]
    if tags and set(tags) != set(meta_graph.meta_info_def.tags):
        return None
    called = _functions_the_object_graph_calls(meta_graph)
    library = meta_graph.graph_def.library.function
    if len(called) == len(library):
        return None
    kept = [f for f in library if f.signature.name in called]
    del library[:]
    library.extend(kept)
    with ops.init_scope():
        loader = tf_load.Loader(meta_graph.object_graph_def, proto, path, checkpoint_options.CheckpointOptions(),
                                tf.saved_model.LoadOptions(), None)
        root = loader.get(0)
        root.graph_debug_info = loader.adjust_debug_info_func_names(debug_info)
    root.tensorflow_version = meta_graph.meta_info_def.tensorflow_version
    root.tensorflow_git_version = meta_graph.meta_info_def.tensorflow_git_version
    return root


def select_signatures(loaded, keys, path):
    available = sorted(loaded.signatures.keys())
    if not available:
        raise errors.BadInputError("SavedModel %s has no signatures" % path)
    keys = list(keys) if keys else available
    unknown = [k for k in keys if k not in loaded.signatures]
    if unknown:
        raise errors.BadInputError("SavedModel %s has no signature %s; available: %s" % (
            path, ", ".join(unknown), ", ".join(available)))
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


def _frozen_graph_def(function, keep):
    """(GraphDef with read-only variables as constants, output tensors) of a ConcreteFunction.

    Control flow stays functional (While/If with body functions), so frames
    never split a loop from the weights fed into it. keep: names of capture
    placeholders to leave as placeholders (variables the function writes).

    convert_variables_to_constants_v2 spends most of its time (and a second
    copy of every weight) wrapping the frozen GraphDef into a new
    ConcreteFunction that we would only turn back into a GraphDef. Its two
    steps before that are called directly when this TensorFlow has them; the
    GraphDef they give is the one that function wraps, with the same node names.
    """
    converter_data = getattr(convert_to_constants, "_FunctionConverterDataInEager", None)
    replace = getattr(convert_to_constants, "_replace_variables_by_constants", None)
    if converter_data is not None and replace is not None:
        data = converter_data(func=function, lower_control_flow=False, aggressive_inlining=False,
                              variable_names_denylist=set(keep) or None)
        graph_def, _ = replace(converter_data=data)
        return graph_def, list(function.outputs)
    if keep:
        raise errors.BadInputError("this TensorFlow's converter cannot keep written variables as variables")
    frozen = convert_to_constants.convert_variables_to_constants_v2(function, lower_control_flow=False)
    return frozen.graph.as_graph_def(), list(frozen.outputs)


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


def freeze(key, function, owners):
    """Freezes a signature's ConcreteFunction into a FrozenSignature.

    Variables the signature only reads become constants; variables it writes
    and other resources (lookup tables) stay placeholders, recorded with the
    trackable in `owners` ({id(handle): trackable}, resources.resource_owners)
    that holds them. The caller keeps the loaded SavedModel alive meanwhile:
    freezing reads its variables.
    """
    written = resources.written_placeholders(function.graph.as_graph_def())
    # A TF1 signature is pruned from the whole MetaGraph and keeps its table-initializer
    # collection, naming ops the pruning removed; Grappler refuses such a graph. The
    # tables are initialized by the objects that own them, not by this graph.
    function.graph.clear_collection(tf.compat.v1.GraphKeys.TABLE_INITIALIZERS)
    try:
        graph_def, output_tensors = _frozen_graph_def(function, written)
    except errors.BnFuseError:
        raise
    except Exception as e:
        raise errors.BadInputError("cannot freeze signature %s: %s" % (key, _first_line(e)))
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
    return FrozenSignature(key, graph_def, inputs, outputs, kept)


# Float constants at least this big become variables of the written model:
# weights then live in variables/ (no 2 GB proto limit, one copy shared by all
# signatures) and load like any TF2 model's, instead of being baked into every
# function. Small and integer constants (shapes, axes) stay constants, because
# shape inference and some kernels need their values at graph build time.
MIN_VARIABLE_BYTES = 1024
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


def _split_weights(graph_def, variables):
    """(graph_def with big float Consts turned into Placeholders, {node name: tf.Variable}).

    variables: a cache {(node name, content digest): tf.Variable} shared by all
    signatures, so equal weights are stored once.
    """
    stripped = graph_pb2.GraphDef()
    stripped.versions.CopyFrom(graph_def.versions)
    stripped.library.CopyFrom(graph_def.library)
    weights = {}
    for node in graph_def.node:
        tensor = node.attr["value"].tensor if node.op == "Const" else None
        if tensor is None or tensor.dtype not in _FLOAT_TYPES or _tensor_nbytes(tensor) < MIN_VARIABLE_BYTES:
            stripped.node.add().CopyFrom(node)
            continue
        key = (node.name, _tensor_digest(tensor))
        if key not in variables:
            value = tf.make_ndarray(tensor)
            variables[key] = tf.Variable(value, trainable=False, name=re.sub(r"[^A-Za-z0-9_.\-]", "_", node.name))
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
    node, port = index.producer(tensor)
    while node is not None and node.op == "Identity" and len(node.input) == 1 and not node.input[0].startswith("^"):
        source, source_port = index.producer(node.input[0])
        if source is None or source.op == "Placeholder":
            break
        node, port = source, source_port
    return "%s:%d" % (node.name, port) if node is not None else tensor


def _signature_function(sig, graph_def, weights):
    """A wrapped function that imports the folded graph, feeding weights from variables
    and kept resources (written variables, tables) from the original objects."""
    input_keys = sorted(sig.inputs)
    output_keys = sorted(sig.outputs)
    returned = [_forwarded_tensor(graph_lib.GraphIndex(graph_def), sig.outputs[k].tensor) for k in output_keys]

    def call(*args):
        input_map = {sig.inputs[k].tensor: arg for k, arg in zip(input_keys, args)}
        for name, variable in weights.items():
            input_map[name + ":0"] = variable.value()  # a bare ReadVariableOp (read_value adds an Identity)
        for name, resource in sig.resources.items():
            # Import cannot map a placeholder to an eager tensor: the function captures the
            # handle, and the capture's placeholder is what the graph reads.
            input_map[name + ":0"] = tf.compat.v1.get_default_graph().capture(resource.handle)
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
    # What a signature is called with; a wrapped function does not record it (TF-TRT sets the same).
    function._arg_keywords = list(input_keys)  # pylint: disable=protected-access
    function._num_positional_args = len(input_keys)  # pylint: disable=protected-access
    return function


def _set_tags(path, tags):
    """tf.saved_model.save always tags its MetaGraph "serve"; give it the input's tags."""
    pb_path = os.path.join(path, "saved_model.pb")
    proto = saved_model_pb2.SavedModel()
    with open(pb_path, "rb") as f:
        proto.ParseFromString(f.read())
    del proto.meta_graphs[0].meta_info_def.tags[:]
    proto.meta_graphs[0].meta_info_def.tags.extend(tags)
    with open(pb_path, "wb") as f:
        f.write(proto.SerializeToString())


class _TF1Initializer(tf.saved_model.experimental.TrackableResource):
    """A TF1 model's main_op / table initializers, run when the output loads (like TF's own
    load_v1_in_v2._Initializer, which TF saves when re-exporting a TF1 model)."""

    def __init__(self, init_fn, asset_paths):
        super().__init__()
        self._init_fn = init_fn
        self._asset_paths = list(asset_paths)
        for i, asset in enumerate(self._asset_paths):
            # Tracked, so that the files are copied into the output's assets/ and the
            # loaded output reads its own copies (a resource does not track attributes).
            self._track_trackable(asset, name="asset_%d" % i)

    def _create_resource(self):
        return tf.constant(1.0)  # a value for the traced create function; the work is in _initialize

    def _initialize(self):
        return self._init_fn(*[path.asset_path for path in self._asset_paths])


def _without_unused_captures(function):
    """function rebuilt from its GraphDef capturing only what its ops read.

    load_v1_in_v2 prunes the init function from the whole MetaGraph, and the
    pruned function captures every variable of it, read or not: saved as it
    is, it would carry the original (unfolded) weights into the output.
    """
    from tensorflow.python.eager import wrap_function
    graph_def = function.graph.as_graph_def()
    read = {graph_lib.parse_input(i)[0] for node in graph_def.node for i in node.input}
    captured = {inner.op.name for _, inner in function.graph.captures}
    inputs = [t.name for t in function.inputs if t.op.name not in captured]
    captures = {inner.op.name: outer for outer, inner in function.graph.captures if inner.op.name in read}
    outputs = [t.name for t in function.outputs] + [op.name for op in function.graph.control_outputs]
    return wrap_function.function_from_graph_def(graph_def, inputs, outputs, captures)


def initializers_to_keep(loaded):
    """Trackables a TF1 SavedModel needs at load time besides its signatures' captures.

    tf.saved_model.load of a TF1 model returns an object whose `initializer`
    runs the MetaGraph's main_op / table initializers with its assets; the
    tables themselves are ops inside the signature graphs, found by shared
    name. Saved with the output, the initializer runs when the output loads.
    """
    is_tf1 = hasattr(loaded, "prune") and hasattr(loaded, "graph")  # what load_v1_in_v2 returns
    initializer = getattr(loaded, "initializer", None) if is_tf1 else None
    if initializer is None:
        return []
    init_fn = getattr(initializer, "_init_fn", None)
    asset_paths = getattr(initializer, "_asset_paths", None)
    if init_fn is None or asset_paths is None:  # another TF's loader: keep it whole
        return [initializer] + list(getattr(loaded, "asset_paths", []))
    return [_TF1Initializer(_without_unused_captures(init_fn), asset_paths)]


def write(signatures, path, tags, initializers=(), root_aliases=None):
    """Writes frozen signatures as one TF2 SavedModel at `path` (which must not exist).

    Each signature is a function that imports its folded GraphDef; big float
    constants are variables, saved once in variables/ and shared between
    signatures whose weights are equal. Written variables and tables the
    signatures capture are saved with their owners (and assets);
    initializers (initializers_to_keep) run when the output loads.
    root_aliases: root functions to keep, as root_functions.find gives them.
    """
    module = tf.Module()
    variables = {}
    split = {}  # id(folded GraphDef) -> (its GraphDef without weights, weights); signatures may share one
    functions = {}
    written = {}  # what a function computes -> the function; signatures folded once share one
    for key, sig in signatures.items():
        if id(sig.graph_def) not in split:
            split[id(sig.graph_def)] = _split_weights(sig.graph_def, variables)
        # Keras 3's "serve" and "serving_default" are one function: written once, the
        # SavedModel holds one copy of the graph, and loading and the first call cost half.
        same = (id(sig.graph_def), tuple(sorted((k, v.tensor) for k, v in sig.inputs.items())),
                tuple(sorted((k, v.tensor) for k, v in sig.outputs.items())), tuple(sorted(sig.resources)))
        if same not in written:
            written[same] = _signature_function(sig, *split[id(sig.graph_def)])
        functions[key] = written[same]
    module.weights = list(variables.values())  # tracked, so they are saved
    # Written variables and tables, with their initializers and assets.
    owners = {id(r.owner): r.owner for sig in signatures.values() for r in sig.resources.values()}
    module.kept_resources = list(owners.values())
    module.initializers = list(initializers)
    root_functions.attach(module, root_aliases or {}, functions)
    # The folded model is for inference: the gradient functions of ops made
    # with tf.custom_gradient (Keras 3's swish) are not saved, and could not
    # be, since the import cut them from the captures they were traced with.
    options = tf.saved_model.SaveOptions(experimental_custom_gradients=False)
    try:
        tf.saved_model.save(module, path, signatures=functions, options=options)
    except (ValueError, TypeError) as e:
        raise errors.BnFuseError("cannot write the folded SavedModel: %s" % _first_line(e))
    if sorted(tags) != ["serve"]:
        _set_tags(path, tags)
