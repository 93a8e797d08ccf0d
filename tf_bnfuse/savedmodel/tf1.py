"""A TF1 SavedModel's initializers (main_op, table initializers with their assets), kept in the output."""

import tensorflow as tf

from tf_bnfuse import graph as graph_lib
from tf_bnfuse.graph import tf_internal


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
            tf_internal.track(self, asset, "asset_%d" % i)

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
    return [_TF1Initializer(_without_unused_captures(init_fn), asset_paths)]
