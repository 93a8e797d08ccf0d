"""What the passes left alone, by batch norm: each pass reports the ops it could not fold, one by
one (a training-mode Keras batch norm is four Muls of its moving averages, each with a reason
about its own input); a user asks which batch norms did not fold, and why. Skips are grouped
by the name scope of the batch norm (or affine chain) they belong to, and a batch norm that
normalizes with the batch's own statistics is named as that, whatever its ops' reasons say.
"""

from tf_bnfuse import graph as graph_lib
from tf_bnfuse import report as report_lib
from tf_bnfuse.passes import grammar

TRAINING_MODE = "training mode: uses the batch's statistics"
_MOMENTS_MEAN = "/moments/mean"  # tf.nn.moments, which Keras' batch normalization calls in training


def batch_statistics_scopes(graph_def):
    """Name scopes of the batch norms of graph_def (and of its functions' bodies, named
    "<function>/<scope>" as fold_in_functions reports them) that use the batch's statistics: a
    FusedBatchNorm with is_training, or moments whose Mean reduces the batch axis (0)."""
    scopes = set()
    bodies = [("", list(graph_def.node))] + [(f.signature.name + "/", list(f.node_def))
                                            for f in graph_def.library.function]
    for prefix, nodes in bodies:
        by_name = {node.name: node for node in nodes}
        for node in nodes:
            if node.op.startswith("FusedBatchNorm") and grammar.is_training(node):
                scopes.add(prefix + _owner(node.name))
            elif node.op == "Mean" and node.name.endswith(_MOMENTS_MEAN) and _reduces_batch_axis(node, by_name):
                # the layer holding the moments; without one (raw ops in a function), the moments alone
                scopes.add(prefix + _owner(node.name[:-len("/mean")]))
    return scopes


def _reduces_batch_axis(mean, by_name):
    """Whether a Mean's constant reduction axes include 0 (LayerNormalization's moments do not)."""
    inputs = graph_lib.data_inputs(mean)
    axes = by_name.get(graph_lib.parse_input(inputs[1])[0]) if len(inputs) > 1 else None
    if axes is None or axes.op != "Const":
        return False
    return 0 in graph_lib.const_array(axes).reshape(-1).tolist()


def _scope(name):
    return name.rsplit("/", 1)[0] if "/" in name else name


_CALL_SCOPES = ("StatefulPartitionedCall", "PartitionedCall")  # a function call's, not a layer's


def _owner(name):
    """The batch norm or chain an op belongs to: the layer whose name scope holds it, or the op
    itself where no layer does (raw ops in a tf.function, whose scope is the call's)."""
    scope = _scope(name)
    return name if scope == name or scope.rsplit("/", 1)[-1] in _CALL_SCOPES else scope


def grouped(scopes, pass_reports):
    """[LeftAlone]: one per batch-statistics scope (TRAINING_MODE, its skipped ops under it, if
    any), then one per batch norm or layer of the other skipped ops (_owner), with its first
    op's reason; an op two passes left alone is listed once."""
    groups = {scope: report_lib.LeftAlone(scope, TRAINING_MODE) for scope in sorted(scopes)}
    by_depth = sorted(scopes, key=len, reverse=True)  # the innermost scope a node is in
    for skip in (s for p in pass_reports for s in p.skips):
        scope = next((s for s in by_depth if skip.node.startswith(s + "/")), None) or _owner(skip.node)
        group = groups.setdefault(scope, report_lib.LeftAlone(scope, skip.reason))
        if all(op.node != skip.node for op in group.ops):  # backward and forward: one op, its first reason
            group.ops.append(skip)
    return list(groups.values())
