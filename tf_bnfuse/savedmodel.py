"""SavedModel I/O: load, freeze each signature to a GraphDef, write a new SavedModel."""

import dataclasses
import os
import re
from typing import Dict, List, Optional

import tensorflow as tf
from tensorflow.core.framework import graph_pb2
from google.protobuf import message
from google.protobuf import text_format
from tensorflow.core.protobuf import meta_graph_pb2
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


def _shape_list(shape):
    return None if shape.rank is None else shape.as_list()


def freeze(key, function):
    """Freezes a signature's ConcreteFunction into a FrozenSignature.

    The caller keeps the loaded SavedModel alive meanwhile: freezing reads its
    variables.
    """
    try:
        frozen = convert_to_constants.convert_variables_to_constants_v2(function)
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
    if len(frozen.outputs) != len(output_keys):
        raise errors.BadInputError("signature %s: %d outputs but %d output keys" % (
            key, len(frozen.outputs), len(output_keys)))
    outputs = {}
    for output_key, frozen_tensor in zip(output_keys, frozen.outputs):
        outputs[output_key] = TensorSpecInfo(frozen_tensor.name, frozen_tensor.dtype,
                                             _shape_list(frozen_tensor.shape))
    graph_def = frozen.graph.as_graph_def()
    # Device pins from the exporting machine would stop the model running elsewhere.
    for node in graph_def.node:
        node.device = ""
    return FrozenSignature(key, graph_def, inputs, outputs)


def _scope_for(key, used):
    scope = re.sub(r"[^A-Za-z0-9_.\-]", "_", key)
    if not re.match(r"[A-Za-z0-9.]", scope):
        scope = "sig" + scope
    while scope in used:
        scope += "_"
    used.add(scope)
    return scope


def _tensor_info(graph, name):
    tensor = graph.get_tensor_by_name(name)
    return meta_graph_pb2.TensorInfo(name=tensor.name, dtype=tensor.dtype.as_datatype_enum,
                                     tensor_shape=tensor.shape.as_proto())


def write(signatures, path, tags):
    """Writes frozen signatures as one SavedModel at `path` (which must not exist).

    One signature is imported with its node names unchanged; several are each
    imported under a name scope of their key, so their nodes cannot collide.
    """
    graph = tf.Graph()
    signature_defs = {}
    used_scopes = set()
    with graph.as_default():
        for key, sig in signatures.items():
            scope = "" if len(signatures) == 1 else _scope_for(key, used_scopes)
            tf.compat.v1.import_graph_def(sig.graph_def, name=scope)
            prefix = scope + "/" if scope else ""
            signature_defs[key] = meta_graph_pb2.SignatureDef(
                inputs={k: _tensor_info(graph, prefix + s.tensor) for k, s in sig.inputs.items()},
                outputs={k: _tensor_info(graph, prefix + s.tensor) for k, s in sig.outputs.items()},
                method_name="tensorflow/serving/predict")
        with tf.compat.v1.Session(graph=graph) as session:
            builder = tf.compat.v1.saved_model.Builder(path)
            builder.add_meta_graph_and_variables(session, list(tags), signature_def_map=signature_defs,
                                                 strip_default_attrs=True)
            builder.save()
