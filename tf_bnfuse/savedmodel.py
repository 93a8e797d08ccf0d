"""SavedModel I/O: load, freeze each signature to a GraphDef, write a new SavedModel."""

import dataclasses
import hashlib
import os
import re
from typing import Dict, List, Optional

import tensorflow as tf
from tensorflow.core.framework import graph_pb2
from google.protobuf import message
from google.protobuf import text_format
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow.python.framework import convert_to_constants

from tf_bnfuse import errors


@dataclasses.dataclass
class TensorSpecInfo:
    """A signature input or output: its tensor in the frozen graph, dtype and shape."""
    tensor: str
    dtype: tf.DType
    shape: Optional[List[Optional[int]]]  # None: unknown rank


@dataclasses.dataclass
class FrozenSignature:
    key: str
    graph_def: graph_pb2.GraphDef
    inputs: Dict[str, TensorSpecInfo]
    outputs: Dict[str, TensorSpecInfo]

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


def check_saved_model_dir(path):
    """Cheap checks before TensorFlow is asked to load anything."""
    if not os.path.exists(path):
        raise errors.BadInputError("SavedModel folder %s does not exist" % path)
    if not os.path.isdir(path):
        raise errors.BadInputError("%s is not a folder" % path)
    if not any(os.path.isfile(os.path.join(path, f)) for f in ("saved_model.pb", "saved_model.pbtxt")):
        raise errors.BadInputError("%s has no saved_model.pb: it is not a SavedModel" % path)
    if not os.path.isdir(os.path.join(path, "variables")):
        raise errors.BadInputError("SavedModel %s has no variables/ folder (an incomplete copy?)" % path)


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


def load(path, tags):
    check_saved_model_dir(path)
    tag_sets = read_tag_sets(path)
    if tags and sorted(tags) not in tag_sets:
        raise errors.BadInputError("SavedModel %s has no MetaGraph with tags %s; available tag sets: %s" % (
            path, ",".join(tags), "; ".join(",".join(t) or "(none)" for t in tag_sets)))
    try:
        return tf.saved_model.load(path, tags=list(tags) if tags else None)
    except Exception as e:  # TF raises many types here; all mean the same to the user.
        raise errors.BadInputError("cannot load SavedModel %s with tags %s: %s" % (
            path, ",".join(tags or []), _first_line(e)))


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


def _shape_list(shape):
    return None if shape.rank is None else shape.as_list()


def _frozen_graph_def(function):
    """(GraphDef with variables as constants, output tensors) of a ConcreteFunction.

    convert_variables_to_constants_v2 spends most of its time (and a second
    copy of every weight) wrapping the frozen GraphDef into a new
    ConcreteFunction that we would only turn back into a GraphDef. Its two
    steps before that are called directly when this TensorFlow has them; the
    GraphDef they give is the one that function wraps, with the same node names.
    """
    converter_data = getattr(convert_to_constants, "_FunctionConverterDataInEager", None)
    replace = getattr(convert_to_constants, "_replace_variables_by_constants", None)
    if converter_data is not None and replace is not None:
        data = converter_data(func=function, lower_control_flow=True, aggressive_inlining=False)
        graph_def, _ = replace(converter_data=data)
        return graph_def, list(function.outputs)
    frozen = convert_to_constants.convert_variables_to_constants_v2(function)
    return frozen.graph.as_graph_def(), list(frozen.outputs)


def freeze(key, function):
    """Freezes a signature's ConcreteFunction into a FrozenSignature.

    The caller keeps the loaded SavedModel alive meanwhile: freezing reads its
    variables.
    """
    try:
        graph_def, output_tensors = _frozen_graph_def(function)
    except Exception as e:
        raise errors.BadInputError("cannot freeze signature %s: %s" % (key, _first_line(e)))
    # A signature's inputs and outputs are dicts; the function's own input and
    # output lists follow their flattening, which sorts by key. (The restored
    # structured_outputs are TensorSpecs, not graph tensors, so position is all
    # there is to go by.)
    input_keys = sorted(function.structured_input_signature[1])
    input_specs = [function.structured_input_signature[1][k] for k in input_keys]
    inputs = {}
    for input_key, spec, placeholder in zip(input_keys, input_specs, function.inputs):
        inputs[input_key] = TensorSpecInfo(placeholder.name, spec.dtype, _shape_list(spec.shape))
    output_keys = sorted(function.structured_outputs)
    if len(output_tensors) != len(output_keys):
        raise errors.BadInputError("signature %s: %d outputs but %d output keys" % (
            key, len(output_tensors), len(output_keys)))
    outputs = {}
    for output_key, tensor in zip(output_keys, output_tensors):
        outputs[output_key] = TensorSpecInfo(tensor.name, tensor.dtype, _shape_list(tensor.shape))
    # Device pins from the exporting machine would stop the model running elsewhere.
    for node in graph_def.node:
        node.device = ""
    return FrozenSignature(key, graph_def, inputs, outputs)


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


def _signature_function(sig, graph_def, weights):
    """A tf.function that imports the folded graph, feeding weights from variables."""
    input_keys = sorted(sig.inputs)
    output_keys = sorted(sig.outputs)

    def call(*args):
        input_map = {sig.inputs[k].tensor: arg for k, arg in zip(input_keys, args)}
        for name, variable in weights.items():
            input_map[name + ":0"] = variable.read_value()
        outputs = tf.graph_util.import_graph_def(
            graph_def, input_map=input_map, return_elements=[sig.outputs[k].tensor for k in output_keys],
            name="")
        # An output that is an input passed through would alias it; TF wants its own tensor.
        return {k: tf.identity(t) for k, t in zip(output_keys, outputs)}

    specs = [tf.TensorSpec(sig.inputs[k].shape, sig.inputs[k].dtype, name=k) for k in input_keys]
    return tf.function(call, input_signature=specs, autograph=False).get_concrete_function()


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


def write(signatures, path, tags):
    """Writes frozen signatures as one TF2 SavedModel at `path` (which must not exist).

    Each signature is a function that imports its folded GraphDef; big float
    constants are variables, saved once in variables/ and shared between
    signatures whose weights are equal.
    """
    module = tf.Module()
    variables = {}
    split = {}  # id(folded GraphDef) -> (its GraphDef without weights, weights); signatures may share one
    functions = {}
    for key, sig in signatures.items():
        if id(sig.graph_def) not in split:
            split[id(sig.graph_def)] = _split_weights(sig.graph_def, variables)
        functions[key] = _signature_function(sig, *split[id(sig.graph_def)])
    module.weights = list(variables.values())  # tracked, so they are saved
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
