"""fold_affine: per-channel Mul/Div/Add/Sub by constants -> the linear op before them.

This is the batch norm as Keras 3 exports it (and tf-keras for rank-2
inputs): after constant_folding, `AddV2(Mul(BiasAdd(conv, b), scale), offset)`.

Pattern (followed along input edges, downward from each linear op):

    linear op -> (Identity | Squeeze | ExpandDims | Reshape | BatchToSpaceND | affine op)* -> ...

where an affine op is Mul, RealDiv, Add, AddV2, Sub or BiasAdd with one
constant operand that is a scalar or varies only along the channel axis, and
a Squeeze keeps the channel axis (Keras lowers Conv1D to ExpandDims -> Conv2D
-> Squeeze). On channel-last data, a BatchToSpaceND (a dilated convolution is
SpaceToBatchND -> conv -> BatchToSpaceND), an ExpandDims before the channel
axis and a Reshape whose last dimension is the channel count are passed. Every tensor on
the way must have exactly one consumer. The
chain is composed into one `x * scale + shift`, folded into the kernel, and
the last affine op becomes BiasAdd(linear op or Squeeze, new bias) under its
own name. (A bias written as Add/AddV2/Sub of a constant alone is rewritten to
that canonical BiasAdd too.)

Left alone, with the reason in the report: a constant that varies along a
non-channel axis, `c - x` and `c / x`, a tensor with another consumer, and
anything after an activation or other op.
"""

import numpy as np
import tensorflow as tf

from tf_bnfuse import fold_math
from tf_bnfuse import graph as graph_lib
from tf_bnfuse import report as report_lib
from tf_bnfuse.passes import linear_ops

NAME = "fold_affine"
AFFINE_OPS = frozenset({"Mul", "RealDiv", "Add", "AddV2", "Sub", "BiasAdd"})
SCALING_OPS = frozenset({"Mul", "RealDiv"})
FLOAT_DTYPES = (tf.float16, tf.bfloat16, tf.float32, tf.float64)


class _Chain:
    """The walk down from one linear op."""

    def __init__(self, match):
        self.match = match
        self.rank = match.spec.rank
        self.channel = match.channel_axis % self.rank  # non-negative channel index
        self.rank_known = True  # False after a Reshape to a rank only known at run time
        self.end_dtype = None  # dtype of the last affine node (after a Cast, not the linear op's)
        self.affine = (np.ones(match.out_channels), np.zeros(match.out_channels))
        self.steps = []  # nodes passed, in order
        self.last_affine = -1  # index in steps of the last affine node
        self.end_channel_first = False  # layout where the last affine node sits
        self.kept = []  # shape-only nodes (Squeeze, Reshape, ...) that stay in the data path
        self.affine_ops = []  # op types of the affine nodes passed
        self.stop_reason = None
        self.stop_nodes = []  # nodes the walk could not pass
        self.stopped_by_node = False  # the stop is about the node itself, not about fan-out


def affine_step(index, node, chain, channels):
    """(scale, shift) of one affine node with a constant operand; raises NoMatch."""
    data_inputs = [i for i in node.input if not i.startswith("^")]
    if len(data_inputs) != 2:
        raise linear_ops.NoMatch("%s has %d inputs" % (node.name, len(data_inputs)))
    values = [index.const_value(i) for i in data_inputs]
    if (values[0] is None) == (values[1] is None):
        raise linear_ops.NoMatch("%s %s does not combine the data with one constant" % (node.op, node.name))
    const_position = 0 if values[0] is not None else 1
    value = values[const_position]
    if node.op == "BiasAdd":
        bias_axis = 1 if graph_lib.attr_string(node, "data_format", "NHWC").startswith("NC") else chain.rank - 1
        if const_position != 1 or bias_axis != chain.channel or np.shape(value) != (channels,):
            raise linear_ops.NoMatch("BiasAdd %s does not add along the channel axis" % node.name)
        vector = np.asarray(value, np.float64)
    else:
        vector = fold_math.as_channel_vector(value, chain.rank, chain.channel, channels)
        if vector is None:
            raise linear_ops.NoMatch("%s %s: constant %s of shape %s varies along a non-channel axis" % (
                node.op, node.name, data_inputs[const_position], list(np.shape(value))))
    if node.op in ("Sub", "RealDiv") and const_position == 0:
        form = "c - x" if node.op == "Sub" else "c / x"
        raise linear_ops.NoMatch("%s %s computes %s, which is not affine in x" % (node.op, node.name, form))
    if node.op == "Mul":
        return vector, np.zeros(channels)
    if node.op == "RealDiv":
        if np.any(vector == 0):
            raise linear_ops.NoMatch("RealDiv %s divides by zero in some channel" % node.name)
        return 1.0 / vector, np.zeros(channels)
    if node.op == "Sub":
        return np.ones(channels), -vector
    return np.ones(channels), vector


def _squeeze_keeps_channel(node, chain):
    dims = [d % chain.rank for d in node.attr["squeeze_dims"].list.i]
    if not dims or chain.channel in dims:
        return False
    chain.channel -= sum(1 for d in dims if d < chain.channel)
    chain.rank -= len(dims)
    return True


def _reshape_rank(index, node):
    """The rank a Reshape outputs, from a constant or Pack-built target shape; None if unknown."""
    target = node.input[1]
    value = index.const_value(target)
    if value is not None:
        return len(value)
    producer, _ = index.skip_identities(target)
    if producer is not None and producer.op == "Pack":
        return len([i for i in producer.input if not i.startswith("^")])
    return None


def _expand_keeps_channel(index, node, chain):
    """An ExpandDims that inserts its axis before a last channel axis."""
    axis = index.const_value(node.input[1])
    if axis is None or np.size(axis) != 1 or chain.channel != chain.rank - 1:
        return False
    axis = int(np.reshape(axis, ()))
    axis = axis + chain.rank + 1 if axis < 0 else axis
    if not 0 <= axis < chain.rank:  # appended after the channel axis
        return False
    chain.rank += 1
    chain.channel += 1
    return True


def _walk(index, match, dtype):
    chain = _Chain(match)
    name, channels = match.linear.name, match.out_channels
    while True:
        consumers = index.data_consumers(name)
        if index.use_count(name) != 1:
            chain.stop_reason = "%s has %d consumers; folding would change the others" % (
                name, index.use_count(name))
            chain.stop_nodes = [c for c, _ in consumers]
            return chain
        if not consumers:  # its one use is as a graph output
            return chain
        (consumer_name, _), = consumers
        node = index.node(consumer_name)
        if node.op in ("Identity", "Snapshot"):
            chain.steps.append(node)
        elif (node.op == "Squeeze" and chain.rank_known and graph_lib.node_dtype(node) == dtype
              and _squeeze_keeps_channel(node, chain)):
            chain.steps.append(node)
            chain.kept.append(node)
        elif (node.op in linear_ops.CHANNEL_PRESERVING_OPS and graph_lib.node_dtype(node) == dtype
              and chain.channel == chain.rank - 1 and linear_ops.keeps_channels_last(index, node, channels)):
            if node.op == "Reshape":
                rank = _reshape_rank(index, node)
                chain.rank_known = rank is not None
                # Of unknown rank (Keras builds the target from Shape(x)), only
                # scalars and channel vectors broadcast without changing the shape.
                chain.rank = rank if rank is not None else 1
                chain.channel = chain.rank - 1
            chain.steps.append(node)
            chain.kept.append(node)
        elif (node.op == "ExpandDims" and chain.rank_known and graph_lib.node_dtype(node) == dtype
              and _expand_keeps_channel(index, node, chain)):
            chain.steps.append(node)
            chain.kept.append(node)
        elif (node.op == "Cast" and graph_lib.node_dtype(node, "SrcT") == dtype
              and graph_lib.node_dtype(node, "DstT") in FLOAT_DTYPES and not node.attr["Truncate"].b):
            # Mixed precision: a float16 conv whose batch norm runs in float32.
            # The Cast stays; the chain goes on in the new dtype.
            dtype = graph_lib.node_dtype(node, "DstT")
            chain.steps.append(node)
            chain.kept.append(node)
        elif node.op in AFFINE_OPS and graph_lib.node_dtype(node) == dtype:
            try:
                step = affine_step(index, node, chain, channels)
            except linear_ops.NoMatch as reason:
                chain.stop_reason, chain.stop_nodes = str(reason), [node.name]
                chain.stopped_by_node = True
                return chain
            chain.affine_ops.append(node.op)
            chain.affine = fold_math.compose_affine(chain.affine, step)
            chain.steps.append(node)
            chain.last_affine = len(chain.steps) - 1
            chain.end_channel_first = chain.channel == 1 and chain.rank > 2
            chain.end_dtype = dtype
        else:
            return chain
        name = node.name


def _is_canonical_bias(index, chain):
    if chain.affine_ops == ["BiasAdd"]:
        return True
    end = chain.steps[chain.last_affine]
    return chain.affine_ops in (["Add"], ["AddV2"]) and linear_ops.misfused_by_remapper(
        index, end.name, chain.end_channel_first)


def _emit(index, editor, match, chain, folded):
    """Folds the chain: kept Squeezes read the linear op, the last affine op becomes a BiasAdd."""
    end = chain.steps[chain.last_affine]
    kept = [n for n in chain.steps[:chain.last_affine] if n in chain.kept]
    anchor = match.linear.name
    for node in kept:
        target = editor.node(node.name)
        position = next(i for i, s in enumerate(target.input) if not s.startswith("^"))
        target.input[position] = anchor
        anchor = node.name
    linear_ops.emit_fold(editor, match, folded, end.name, anchor=anchor, channel_first=chain.end_channel_first,
                         index=index)
    return [n.name for n in chain.steps[:chain.last_affine] if n not in chain.kept]


def _why_not_folded(index, node, explained):
    """Why an affine node by a constant was not folded.

    Walks up through affine ops and Squeezes to the op that feeds the chain.
    The nearest node on the way where a chain from a linear op stopped gives
    the reason; otherwise the feeding op is not a (foldable) linear op.
    """
    current = node
    while True:
        if current.name in explained:
            return explained[current.name]
        inputs = [i for i in current.input if not i.startswith("^") and index.const_value(i) is None]
        if len(inputs) != 1:
            return "%s %s combines two non-constant tensors" % (current.op, current.name)
        producer, _ = index.skip_identities(inputs[0])
        if producer is None:
            return "its input has no producer in the graph"
        if producer.name in explained:
            return explained[producer.name]
        if (producer.op in AFFINE_OPS or producer.op in ("Squeeze", "ExpandDims")
                or producer.op in linear_ops.CHANNEL_PRESERVING_OPS):
            current = producer
            continue
        return "input comes from %s (%s), not from a supported linear op" % (producer.name, producer.op)


def _has_one_constant_operand(index, node):
    data_inputs = [i for i in node.input if not i.startswith("^")]
    return len(data_inputs) == 2 and sum(index.const_value(i) is not None for i in data_inputs) == 1


def run(graph_def, outputs):
    index = graph_lib.GraphIndex(graph_def, outputs)
    editor = graph_lib.GraphEditor(graph_def)
    report = report_lib.PassReport(NAME, nodes_before=len(graph_def.node))
    explained = {}  # node name -> why a chain from a linear op did not pass it
    stopped_at = set()  # affine nodes that stopped a chain by their own form
    folded_nodes = set()
    for node in graph_def.node:
        if linear_ops.linear_op_of(index, node) is None:
            continue
        try:
            match = linear_ops.linear_kernel(index, node)
        except linear_ops.NoMatch as reason:
            for consumer, _ in index.data_consumers(node.name):
                explained[consumer] = str(reason)
            continue
        # the chain's ops must share the linear op's dtype (a Cast ends it)
        chain = _walk(index, match, match.dtype)
        # A lone BiasAdd is already the canonical form; anything else becomes one, except a
        # lone Add where the remapper would fuse a BiasAdd wrongly (that Add is the safe form).
        if chain.affine_ops and not _is_canonical_bias(index, chain) and match.dtype.is_floating:
            try:
                folded = linear_ops.fold_weights(match, chain.affine[0], chain.affine[1], chain.end_dtype)
            except linear_ops.NoMatch as reason:
                end = chain.steps[chain.last_affine]
                report.skips.append(report_lib.Skip(end.name, end.op, str(reason)))
                folded_nodes.update(n.name for n in chain.steps[:chain.last_affine + 1])  # explained here
                continue
            absorbed = _emit(index, editor, match, chain, folded)
            end = chain.steps[chain.last_affine]
            folded_nodes.update(n.name for n in chain.steps[:chain.last_affine + 1])
            report.folds.append(report_lib.Fold(end.name, end.op, node.name, match.op_description, absorbed))
        for stop in chain.stop_nodes:
            explained.setdefault(stop, chain.stop_reason)
            if chain.stopped_by_node:
                stopped_at.add(stop)

    # Report every Mul/RealDiv by a constant left in place (a batch norm's
    # scale), and any other affine op where a chain from a linear op stopped.
    # Dead nodes (e.g. inside a constant subgraph already folded) are not.
    live = graph_lib.live_nodes(graph_def, outputs)
    for node in graph_def.node:
        if (node.name in folded_nodes or node.name not in live
                or not _has_one_constant_operand(index, node)):
            continue
        if node.op in SCALING_OPS or node.name in stopped_at:
            report.skips.append(report_lib.Skip(node.name, node.op, _why_not_folded(index, node, explained)))
    report.nodes_after = len(editor.graph_def.node)
    return editor.graph_def, report
