"""A TF1 SavedModel's initializers (main_op, table initializers with their assets), kept in the
output, and where its saver restores each variable from (checkpoint_keys)."""

import re

import tensorflow as tf

from tf_bnfuse import graph as graph_lib
from tf_bnfuse.graph import tf_internal


class _TF1Initializer(tf.saved_model.experimental.TrackableResource):
    """A TF1 model's main_op / table initializers, run when the output loads (like TF's own
    load_v1_in_v2._Initializer, which TF saves when re-exporting a TF1 model)."""

    def __init__(self, init_fn, asset_paths, variables=()):
        super().__init__()
        self._init_fn = init_fn
        self._asset_paths = list(asset_paths)
        for i, asset in enumerate(self._asset_paths):
            # Tracked, so that the files are copied into the output's assets/ and the
            # loaded output reads its own copies (a resource does not track attributes).
            tf_internal.track(self, asset, "asset_%d" % i)
        for i, variable in enumerate(variables):
            # The variables it initializes (a local variable no signature reads): saved
            # with it, or its function would capture what the output does not hold.
            tf_internal.track(self, variable, "variable_%d" % i)

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
    graph_def = function.graph.as_graph_def()
    read = {graph_lib.parse_input(i)[0] for node in graph_def.node for i in node.input}
    captured = {inner.op.name for _, inner in function.graph.captures}
    inputs = [t.name for t in function.inputs if t.op.name not in captured]
    captures = {inner.op.name: outer for outer, inner in function.graph.captures if inner.op.name in read}
    outputs = [t.name for t in function.outputs] + [op.name for op in function.graph.control_outputs]
    return tf_internal.function_from_graph_def(graph_def, inputs, outputs, captures)


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
    init_fn, asset_paths = tf_internal.tf1_initializer_parts(initializer)
    if init_fn is None or asset_paths is None:  # another TF's loader: keep it whole
        return [initializer] + list(getattr(loaded, "asset_paths", []))
    init_fn = _without_unused_captures(init_fn)
    captured = {id(outer) for outer, _ in init_fn.graph.captures}
    variables = [v for v in getattr(loaded, "variables", ()) if id(v.handle) in captured]
    return [_TF1Initializer(init_fn, asset_paths, variables)]


# The init ops a TF1 loader runs after the saver has restored the variables.
_INIT_OP_COLLECTIONS = ("saved_model_main_op", "legacy_init_op")
_INIT_OP_SIGNATURE = "__saved_model_init_op"
_VARIABLE_OPS = ("VarHandleOp", "VariableV2", "Variable")
# Ops whose first input is a variable they write (Assign, AssignAdd, ScatterUpdate, ApplyAdam...).
_WRITES_ITS_FIRST_INPUT = re.compile(r"^(Resource)?(Sparse)?(Assign|Scatter|Apply)")


def checkpoint_keys(meta_graph, checkpoint):
    """{variable node name: its key in the checkpoint} of the variables a TF1 MetaGraph's saver
    restores whole (a RestoreV2 key without a slice, of the variable's dtype and shape in the
    checkpoint's index): what is read there again is the value the variable holds once loaded,
    where no init op writes it afterwards (written_at_load; a fold check reads a released kernel
    back, graph/weights.py). checkpoint: tf.train.load_checkpoint of the model's own checkpoint."""
    restore_op = meta_graph.saver_def.restore_op_name
    nodes = {n.name: n for n in meta_graph.graph_def.node}
    if not restore_op or restore_op.split(":")[0] not in nodes:
        return {}
    shapes, dtypes = checkpoint.get_variable_to_shape_map(), checkpoint.get_variable_to_dtype_map()
    keys = {}
    for name in graph_lib.cone(nodes.get, [restore_op]):
        node = nodes.get(name)
        data = graph_lib.data_inputs(node) if node is not None and node.op in ("Assign", "AssignVariableOp") else []
        if len(data) < 2:
            continue
        source, port, _ = graph_lib.parse_input(graph_lib.forwarded_input(data[1], nodes.get))
        restore = nodes.get(source)
        if restore is None or restore.op != "RestoreV2" or len(restore.input) < 3:
            continue
        names, slices = [_strings(nodes.get(graph_lib.parse_input(i)[0])) for i in restore.input[1:3]]
        variable = nodes.get(graph_lib.parse_input(graph_lib.forwarded_input(data[0], nodes.get))[0])
        if variable is not None and variable.op not in _VARIABLE_OPS:
            variable = None
        if names is None or slices is None or port >= min(len(names), len(slices)) or slices[port] or variable is None:
            continue
        key = names[port]
        dtype = variable.attr["dtype"].type
        shape = [d.size for d in variable.attr["shape"].shape.dim]
        if key in shapes and list(shapes[key]) == shape and dtypes[key].as_datatype_enum == dtype:
            keys[variable.name] = key
    return keys


def _strings(node):
    """The strings of a Const of strings, or None."""
    if node is None or node.op != "Const":
        return None
    return [s.decode("utf-8", "replace") for s in node.attr["value"].tensor.string_val]


def written_at_load(meta_graph):
    """Names of the variables a TF1 MetaGraph's init ops (main_op, legacy_init_op) write: they run
    after the saver's restore, each time the model loads."""
    nodes = {n.name: n for n in meta_graph.graph_def.node}
    # (`in` first: reading a missing key of a proto map would add it to the parsed input)
    init_ops = [name for key in _INIT_OP_COLLECTIONS if key in meta_graph.collection_def
                for name in meta_graph.collection_def[key].node_list.value]
    if _INIT_OP_SIGNATURE in meta_graph.signature_def:
        init_ops += [t.name for t in meta_graph.signature_def[_INIT_OP_SIGNATURE].outputs.values()]
    written = set()
    for name in graph_lib.cone(nodes.get, [n for n in init_ops if graph_lib.parse_input(n)[0] in nodes]):
        node = nodes.get(name)
        data = graph_lib.data_inputs(node) if node is not None and _WRITES_ITS_FIRST_INPUT.match(node.op) else []
        if data:
            written.add(graph_lib.parse_input(graph_lib.forwarded_input(data[0], nodes.get))[0])
    return written
