"""fold_forward: a batch norm (or per-channel Mul/Add) -> the linear op AFTER it.

Pattern (along input edges, upward from each linear op's data input):

    x -> (FusedBatchNorm* | affine op+) -> (Identity | Pad of zero width)* -> Conv2D / DepthwiseConv2dNative / MatMul

This is what the other passes cannot reach: a batch norm that follows a pool,
a concat or the model input, feeding a convolution directly. By linearity,
`conv(x * s + t, W) = conv(x, W * s) + conv(t, W)` (see
fold_math.fold_affine_into_next_linear), which holds only where the conv reads
no zero padding: VALID padding, EXPLICIT padding of zero width, a 1x1 kernel,
or a map with no shift at all (0 * s is still 0). The affine output must have
no other consumer. The linear op then reads x through a new kernel, and the
constant conv(t, W) is added by a BiasAdd after it: merged into the BiasAdd
already there, or a new one that takes over the linear op's name (the op is
renamed), so its consumers and any signature output that names it are
unchanged.

Left alone, with the reason: padding that would change, another consumer, a
non-constant or non-per-channel parameter. Chains of Add alone (a bias) are
not sources: they belong to the linear op before them.
"""

import types

import numpy as np

from tf_bnfuse import fold_math
from tf_bnfuse import graph as graph_lib
from tf_bnfuse import report as report_lib
from tf_bnfuse.passes import fold_affine
from tf_bnfuse.passes import fold_batch_norm
from tf_bnfuse.passes import linear_ops

NAME = "fold_forward"
# op -> kernel axis of its input channels
TARGET_OPS = {"Conv2D": 2, "DepthwiseConv2dNative": 2, "MatMul": 0}


def _in_channel_axis(node):
    if node.op == "MatMul":
        return 1 if node.attr["transpose_b"].b else 0
    return TARGET_OPS[node.op]


def _reads_no_padding(node, kernel):
    if node.op == "MatMul":
        return True
    padding = graph_lib.attr_string(node, "padding", "VALID")
    if padding == "VALID":
        return True
    if padding == "EXPLICIT":
        return not any(node.attr["explicit_paddings"].list.i)
    return padding == "SAME" and kernel.shape[0] == 1 and kernel.shape[1] == 1


def _source_chain(index, linear, in_channels, rank, channel):
    """(x input, [source nodes], scale, shift, absorbed Identities) feeding the linear op's data input.

    Raises NoMatch with a reason when the input is an affine source that
    cannot fold; returns None when the input is not an affine source at all.
    """
    data_input = [i for i in linear.input if not i.startswith("^")][0]
    absorbed = []  # (node, port) of Identities between the source and the linear op
    node, port = index.producer(data_input)
    while node is not None and (node.op in ("Identity", "Snapshot") or _zero_width_pad(index, node)):
        absorbed.append((node, port))
        node, port = index.producer(node.input[0])
    if node is None:
        return None
    if node.op in fold_batch_norm.BATCH_NORM_OPS:
        if port != 0:
            return None
        bn_axis = 1 if graph_lib.attr_string(node, "data_format", "NHWC").startswith("NC") else rank - 1
        if bn_axis != channel:
            raise linear_ops.NoMatch("data_format %s does not match %s %s" % (
                graph_lib.attr_string(node, "data_format", "NHWC"), linear.op, linear.name))
        scale, shift = fold_batch_norm.affine_of(index, node)
        if scale.shape != (in_channels,):
            raise linear_ops.NoMatch("has %d channels but %s reads %d" % (scale.size, linear.name, in_channels))
        _check_single_uses(index, [(node, 0)] + absorbed)
        return node.input[0], [node], scale, shift, [n.name for n, _ in absorbed]
    # A chain of affine ops by constants, walked upward; composed from x on.
    chain, steps = [], []
    layout = types.SimpleNamespace(rank=rank, channel=channel)  # what affine_step reads of a chain
    while node is not None and node.op in fold_affine.AFFINE_OPS and port == 0:
        if graph_lib.node_dtype(node) != graph_lib.node_dtype(linear):
            break
        try:
            step = fold_affine.affine_step(index, node, layout, in_channels)
        except linear_ops.NoMatch:
            break
        chain.append(node)
        steps.append(step)
        data = [i for i in node.input if not i.startswith("^") and index.const_value(i) is None][0]
        node, port = index.producer(data)
    # Nothing, or only a bias: that belongs to the op before (a folded batch norm is a BiasAdd now).
    if not chain or not any(n.op in fold_affine.SCALING_OPS for n in chain):
        return None
    _check_single_uses(index, [(n, 0) for n in chain] + absorbed)
    affine = (np.ones(in_channels), np.zeros(in_channels))
    for step in reversed(steps):
        affine = fold_math.compose_affine(affine, step)
    x = [i for i in chain[-1].input if not i.startswith("^") and index.const_value(i) is None][0]
    return x, chain, affine[0], affine[1], [n.name for n, _ in absorbed]


def _fed_by_affine(index, linear):
    """Whether the op's data input comes (through Identity and empty Pads) from a batch norm or
    an affine op: a cheap test before its kernel is read."""
    node, _ = index.producer([i for i in linear.input if not i.startswith("^")][0])
    while node is not None and (node.op in ("Identity", "Snapshot") or _zero_width_pad(index, node)):
        node, _ = index.producer(node.input[0])
    return node is not None and (node.op in fold_batch_norm.BATCH_NORM_OPS or node.op in fold_affine.AFFINE_OPS)


def _zero_width_pad(index, node):
    """A Pad that adds nothing: as good as an Identity for the fold (a real pad would add zeros)."""
    if node.op not in ("Pad", "PadV2"):
        return False
    paddings = index.const_value([i for i in node.input if not i.startswith("^")][1])
    return paddings is not None and not np.any(paddings)


def _check_single_uses(index, nodes_and_ports):
    for node, port in nodes_and_ports:
        linear_ops.single_use(index, node, port)


def run(graph_def, outputs):
    index = graph_lib.GraphIndex(graph_def, outputs)
    editor = graph_lib.GraphEditor(graph_def)
    report = report_lib.PassReport(NAME, nodes_before=len(graph_def.node))
    used_sources = set()
    for linear in graph_def.node:
        if linear.op not in TARGET_OPS or linear.name not in index.live or not _fed_by_affine(index, linear):
            continue
        try:  # reads the kernel: only for the few ops a batch norm or Mul/Add feeds
            match = linear_ops.linear_kernel(index, linear)
        except linear_ops.NoMatch:
            continue
        in_axis = _in_channel_axis(linear)
        in_channels = match.kernel.shape[in_axis]
        rank = match.spec.rank
        channel = match.channel_axis % rank
        try:
            found = _source_chain(index, linear, in_channels, rank, channel)
            if found is None:
                continue
            x, sources, scale, shift, absorbed = found
            if any(s.name in used_sources for s in sources):
                continue
            if np.any(shift != 0) and not _reads_no_padding(linear, match.kernel):
                raise linear_ops.NoMatch(
                    "feeds %s %s, which pads with zeros (padding %s): the shift would not reach the padding"
                    % (linear.op, linear.name, graph_lib.attr_string(linear, "padding")))
            if not np.all(np.isfinite(scale)) or not np.all(np.isfinite(shift)):
                raise linear_ops.NoMatch("NaN or Inf in its scale or shift")
        except linear_ops.NoMatch as reason:
            head = index.skip_identities([i for i in linear.input if not i.startswith("^")][0])[0]
            report.skips.append(report_lib.Skip(head.name, head.op, str(reason)))
            continue
        _emit(index, editor, match, in_axis, x, scale, shift)
        used_sources.update(s.name for s in sources)
        report.folds.append(report_lib.Fold(sources[0].name, sources[0].op, linear.name, linear.op,
                                            absorbed + [s.name for s in sources[1:]]))
    report.nodes_after = len(editor.graph_def.node)
    return editor.graph_def, report


def _emit(index, editor, match, in_axis, x, scale, shift):
    linear = match.linear
    new_kernel, added_bias = fold_math.fold_affine_into_next_linear(
        match.kernel, scale, shift, in_axis, match.out_channel_axes)
    dtype = match.dtype
    target = editor.node(linear.name)
    data_positions = [i for i, s in enumerate(target.input) if not s.startswith("^")]
    target.input[data_positions[0]] = x
    if not np.all(scale == 1.0):
        target.input[data_positions[match.spec.kernel_input]] = editor.add_const(
            match.kernel_const + "_forward_folded", new_kernel, dtype)
    if not np.any(added_bias != 0):
        return
    # Merge into a BiasAdd that is the op's only consumer, if there is one.
    consumers = index.data_consumers(linear.name)
    if len(consumers) == 1 and not index.is_output(linear.name):
        consumer = index.node(consumers[0][0])
        if consumer.op == "BiasAdd":
            old = index.const_value(consumer.input[1])
            if old is not None and np.shape(old) == added_bias.shape:
                editor.node(consumer.name).input[1] = editor.add_const(
                    linear.name + "/bias_forward_folded", np.asarray(old, np.float64) + added_bias, dtype)
                return
    # Otherwise a new BiasAdd takes the op's name; the op gets a new one.
    new_name = editor.unique_name(linear.name + "/forward_folded")
    editor.rename_node(linear.name, new_name)
    bias = editor.add_const(linear.name + "/bias_forward_folded", added_bias, dtype)
    linear_ops.bias_node(editor, linear.name, new_name, bias, dtype, match.channel_first, index, replace=False)
