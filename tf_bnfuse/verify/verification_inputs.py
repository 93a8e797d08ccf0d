"""The inputs verification runs both models on: the user's (--verify_inputs), else seeded values
the graph accepts.

- Integer inputs that index something (a Gather's rows: an embedding; a
  OneHot's depth) get ids below that bound, read off the frozen graph.
  Without one, small values [0, 8), and the report says which bound was used.
- String inputs get words of the model's vocabulary: its text assets, else
  the string constants of its graph (Keras' StringLookup keeps its list there).
- Floats are standard normal.
"""

import dataclasses
import os
from typing import Optional

import numpy as np
import tensorflow as tf

from tf_bnfuse import errors
from tf_bnfuse import graph as graph_lib

# A word no vocabulary has, so that the out-of-vocabulary path runs too.
OUT_OF_VOCABULARY = "tf_bnfuse-out-of-vocabulary"
DEFAULT_INTEGER_BOUND = 8
_MAX_VOCABULARY = 10000
# op -> the input positions whose values an index keeps through it, on its way to what it
# indexes. A select returns one of its branches: Keras 3's Embedding wraps negative ids as
# SelectV2(ids < 0, ids + rows, ids).
_INDEX_PASS_THROUGH = {op: (0,) for op in ("Identity", "Cast", "Reshape", "ExpandDims", "Squeeze", "Snapshot",
                                           "StopGradient", "ClipByValue")}
_INDEX_PASS_THROUGH.update({"SelectV2": (1, 2), "Select": (1, 2)})


@dataclasses.dataclass
class IndexBound:
    """Test values for an input are drawn from [0, high)."""
    high: int
    source: str  # what set it, for the report

    def describe(self):
        return "[0, %d) from %s" % (self.high, self.source)


def model_vocabulary(saved_model_dir, proto):
    """Words the model knows: lines of its text assets (first tab-separated field), then the
    string constants of its graph and functions (proto: its parsed saved_model.pb).

    Lookup tables are built from these; test strings drawn from them reach the
    table's real entries, not only its default value.
    """
    words = []
    for root, _, files in os.walk(os.path.join(saved_model_dir, "assets")):
        for name in sorted(files):
            try:
                with open(os.path.join(root, name), encoding="utf-8") as f:
                    words.extend(w for w in (line.rstrip("\r\n").split("\t")[0] for line in f) if w)
            except (UnicodeDecodeError, OSError):
                continue  # a binary asset holds no words
    if not words:
        words = _string_constants(proto)
    return words[:_MAX_VOCABULARY]


def _string_constants(proto):
    words = []
    for meta_graph in proto.meta_graphs:
        graph_def = meta_graph.graph_def
        for node in list(graph_def.node) + [n for f in graph_def.library.function for n in f.node_def]:
            if node.op == "Const" and node.attr["dtype"].type == tf.string.as_datatype_enum:
                for value in node.attr["value"].tensor.string_val:
                    word = value.decode("utf-8", "replace")
                    # Paths and op names are strings too; a vocabulary entry is short and one line.
                    if word and len(word) < 64 and "/" not in word and "\n" not in word:
                        words.append(word)
    return list(dict.fromkeys(words))


def _static_dim(index, input_str, axis):
    """Dimension `axis` of a Const's shape, without reading its values (an embedding may be big)."""
    node = index.const_node(input_str)
    if node is None:
        return None
    dims = [d.size for d in node.attr["value"].tensor.tensor_shape.dim]
    return dims[axis % len(dims)] if dims and -len(dims) <= axis < len(dims) else None


def index_bounds(graph_def, inputs):
    """{input key: IndexBound} for the inputs that reach a Gather's indices or a OneHot's indices.

    inputs: {key: TensorSpecInfo} of a signature, in the (frozen) graph_def.
    The tightest bound wins when an input indexes several things.
    """
    index = graph_lib.GraphIndex(graph_def)
    bounds = {}
    for key, spec in inputs.items():
        name, port = graph_lib.canonical_tensor(spec.tensor)
        stack, seen, found = [(name, port)], set(), []
        while stack:
            tensor = stack.pop()
            if tensor in seen:
                continue
            seen.add(tensor)
            for consumer_name, position in index.data_consumers(*tensor):
                node = index.node(consumer_name)
                data = graph_lib.data_inputs(node)
                if position in _INDEX_PASS_THROUGH.get(node.op, ()):
                    stack.append((node.name, 0))
                elif node.op in ("GatherV2", "Gather", "ResourceGather") and position == 1:
                    axis = 0
                    if node.op == "GatherV2":
                        axis_value = index.const_value(data[2])
                        axis = int(np.reshape(axis_value, ())) if axis_value is not None else None
                    rows = _static_dim(index, data[0], axis) if axis is not None else None
                    if rows:
                        found.append(IndexBound(rows, "the %d rows of %s" % (rows, data[0])))
                elif node.op == "OneHot" and position == 0:
                    depth = index.const_value(data[1])
                    if depth is not None and int(depth) > 0:
                        found.append(IndexBound(int(depth), "the depth %d of %s" % (int(depth), node.name)))
        if found:
            bounds[key] = min(found, key=lambda b: b.high)
    return bounds


def given_inputs(path, input_specs, flag="{--verify_inputs}"):
    """{signature: {input: array}} from a .npz (or a dict) of arrays named INPUT or SIGNATURE/INPUT
    (or one array, for signatures of one input).

    A SIGNATURE/INPUT array is for that signature only; an INPUT array for
    every signature with an input of that name. Raises BadInputError (one
    line) for an array that names no input, or whose shape or dtype the
    input does not take.
    """
    if isinstance(path, np.ndarray):  # the Python API's one array, for models of one input
        names = {name for specs in input_specs.values() for name in specs}
        if any(len(specs) != 1 for specs in input_specs.values()) or len(names) != 1:
            raise errors.BadInputError("%s: one array is for a model whose signatures take one input; these take "
                                       "%s: give a dict" % (flag, ", ".join(sorted(names))))
        path = {names.pop(): path}
    if isinstance(path, dict):  # the Python API's arrays, named the same way
        arrays, path = {k: np.asarray(v) for k, v in path.items()}, "(arrays)"
    else:
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
        except (OSError, ValueError) as e:
            raise errors.BadInputError("%s %s cannot be read: %s" % (flag, path, errors.most_specific_line(e)))
    given, used = {}, set()
    for signature, specs in input_specs.items():
        for name, spec in specs.items():
            key = next((k for k in ("%s/%s" % (signature, name), name) if k in arrays), None)
            if key is None:
                continue
            used.add(key)
            given.setdefault(signature, {})[name] = _checked(flag, path, key, arrays[key], spec)
    unused = sorted(set(arrays) - used)
    if unused:
        known = sorted({"%s/%s" % (s, n) for s, specs in input_specs.items() for n in specs})
        raise errors.BadInputError("%s %s: %s names no signature input; the inputs are %s" % (
            flag, path, ", ".join(unused), ", ".join(known)))
    return given


def check_complete(given, input_specs, flag):
    """BadInputError unless `given` has an array for every input of every signature."""
    missing = sorted("%s/%s" % (s, n) for s, specs in input_specs.items() for n in specs
                     if n not in given.get(s, {}))
    if missing:
        raise errors.BadInputError("%s has no array for %s (name one INPUT or SIGNATURE/INPUT)" % (
            flag, ", ".join(missing)))


def _checked(flag, path, key, value, spec):
    dtype = spec.dtype
    kind = value.dtype.kind
    accepted = (dtype.is_floating and kind == "f") or (dtype.is_integer and kind in "iu") or \
        (dtype == tf.bool and kind == "b") or (dtype == tf.string and kind in "SU")
    if not accepted:
        raise errors.BadInputError("%s %s: %s is %s, the input takes %s" % (flag, path, key, value.dtype, dtype.name))
    if spec.shape is not None and (value.ndim != len(spec.shape) or any(
            d is not None and d != n for d, n in zip(spec.shape, value.shape))):
        raise errors.BadInputError("%s %s: %s has shape %s, the input takes %s" % (
            flag, path, key, tuple(value.shape), tuple(-1 if d is None else d for d in spec.shape)))
    return value.astype(bytes) if dtype == tf.string else value.astype(dtype.as_numpy_dtype)


# The rank an op needs of its data input (input 0), and the dim of its input 1's constant shape
# that gives the channel count (None: no channel count); the channel axis is the last, or 1
# where data_format starts with "NC". A MatMul's is read from transpose_b.
_SHAPE_OF_DATA_INPUT = {
    "Conv2D": (4, 2), "DepthwiseConv2dNative": (4, 2), "Conv3D": (5, 3), "MatMul": (2, 0),
    "MaxPool": (4, None), "AvgPool": (4, None),
    "FusedBatchNorm": (4, 0), "FusedBatchNormV2": (4, 0), "FusedBatchNormV3": (4, 0),
}


def input_shapes(graph_def, inputs):
    """{input key: [dim or None, ...]} for the inputs of unknown rank whose first consumer (through
    Identities) needs a rank: a Conv2D's input is [N, H, W, C] with C from its kernel, a MatMul's
    [N, K], a Reshape's the constant shape it reshapes to (its -1 free). inputs: {key:
    TensorSpecInfo} of a signature, in the (frozen) graph_def."""
    unknown = {key: spec for key, spec in inputs.items() if spec.shape is None}
    if not unknown:
        return {}  # the common case, without indexing the frozen graph a second time (index_bounds does)
    index = graph_lib.GraphIndex(graph_def)
    shapes = {}
    for key, spec in unknown.items():
        name, port = graph_lib.canonical_tensor(spec.tensor)
        consumers = index.data_consumers(name, port)
        while len(consumers) == 1 and index.node(consumers[0][0]).op in ("Identity", "StopGradient"):
            consumers = index.data_consumers(consumers[0][0])
        found = [_shape_needed(index, index.node(c), position) for c, position in consumers]
        found = [s for s in found if s is not None]
        if found:
            shapes[key] = found[0]
    return shapes


def _shape_needed(index, node, position):
    """The shape (None for free dims) a node needs of its data input, or None."""
    if node.op == "Reshape" and position == 0:
        return _reshaped_to(index, node)
    if node.op not in _SHAPE_OF_DATA_INPUT or position != 0 or (node.op == "MatMul" and node.attr["transpose_a"].b):
        return None
    rank, dim = _SHAPE_OF_DATA_INPUT[node.op]
    if node.op == "MatMul" and node.attr["transpose_b"].b:
        dim = 1
    shape = [None] * rank
    source = index.const_shape(graph_lib.data_inputs(node)[1]) if dim is not None else None
    if source is not None and len(source) > dim:
        channel = 1 if graph_lib.attr_string(node, "data_format", "NHWC").startswith("NC") else rank - 1
        shape[channel] = int(source[dim])
    return shape


def _reshaped_to(index, node):
    """The constant target shape of a Reshape with its one -1 as a free dim: an input of that
    shape has a size the Reshape takes. None for a target that is not constant or has more
    than one -1."""
    target = index.const_value(graph_lib.data_inputs(node)[1])
    if target is None or target.ndim != 1 or list(target).count(-1) > 1 or (target < -1).any():
        return None
    return [None if d == -1 else int(d) for d in target]


def random_inputs(input_specs, rng, batch_size, unknown_dim_size, vocabulary=(), bounds=None, shapes=None):
    """Seeded values for each signature input; unknown dims get small sizes.

    bounds: {input key: IndexBound} for inputs that index something; an
    integer (or float-cast-to-index) input draws its values below the bound.
    shapes: {input key: [dim or None, ...]} for inputs of unknown rank (input_shapes).
    """
    bounds, shapes = bounds or {}, shapes or {}
    values = {}
    for key in sorted(input_specs):
        spec = input_specs[key]
        known = spec.shape if spec.shape is not None else shapes.get(key)
        if known is None:
            raise errors.BadInputError(
                "input %s has unknown rank, and no op it feeds says which: pass {--verify_inputs}" % key)
        shape = [(batch_size if i == 0 else unknown_dim_size) if d is None else d
                 for i, d in enumerate(known)]
        dtype = spec.dtype
        bound: Optional[IndexBound] = bounds.get(key)
        if (dtype.is_integer or dtype.is_floating) and bound is not None:
            value = rng.integers(0, bound.high, size=shape).astype(dtype.as_numpy_dtype)
        elif dtype.is_floating:
            value = rng.standard_normal(shape).astype(dtype.as_numpy_dtype)
        elif dtype.is_integer:
            value = rng.integers(0, DEFAULT_INTEGER_BOUND, size=shape).astype(dtype.as_numpy_dtype)
        elif dtype == tf.bool:
            value = rng.integers(0, 2, size=shape).astype(bool)
        elif dtype == tf.string and vocabulary:
            words = np.array(list(vocabulary) + [OUT_OF_VOCABULARY], dtype=object)
            value = words[rng.integers(0, len(words), size=shape)].astype(bytes)
        elif dtype == tf.string:
            raise errors.BadInputError(
                "input %s is a string, and the SavedModel has no vocabulary (text asset or string "
                "constant) to draw test words from; pass {--verify_inputs}" % key)
        else:
            raise errors.BadInputError(
                "input %s has dtype %s, for which no test input can be made; pass {--verify_inputs}"
                % (key, dtype.name))
        values[key] = value
    return values


def make_inputs(input_specs, verify_config, vocabulary=(), bounds=None, given=None, shapes=None):
    """{signature: {input: array}}: the given arrays, seeded values for the rest.

    The same for every run with the same config and model. bounds, given and shapes
    (input_shapes) are {signature: {input: ...}}.
    """
    rng = np.random.default_rng(verify_config.get("seed", 0))
    bounds, given, shapes = bounds or {}, given or {}, shapes or {}
    result = {}
    for key in sorted(input_specs):
        drawn = {k: s for k, s in input_specs[key].items() if k not in given.get(key, {})}
        made = random_inputs(drawn, rng, verify_config.get("batch_size", 2), verify_config.get("unknown_dim_size", 16),
                             vocabulary, bounds.get(key), shapes.get(key))
        made.update(given.get(key, {}))
        result[key] = made
    return result


def describe_integer_inputs(input_specs, bounds, given):
    """{"signature/input": how its test values were chosen} for integer inputs, for the report."""
    notes = {}
    for signature, specs in sorted(input_specs.items()):
        for name, spec in sorted(specs.items()):
            where = "%s/%s" % (signature, name)
            if name in given.get(signature, {}):
                notes[where] = "given (--verify_inputs)"
            elif name in bounds.get(signature, {}):
                notes[where] = bounds[signature][name].describe()
            elif spec.dtype.is_integer:
                notes[where] = "[0, %d): no bound found in the graph" % DEFAULT_INTEGER_BOUND
    return notes
