"""fold_batch_norm: inference FusedBatchNorm/V2/V3 -> the linear op before it.

Pattern (followed along input edges, upward from the batch norm):

    linear op -> Identity* -> [BiasAdd | Add(const)] -> Identity* -> FusedBatchNorm*

Replacement: the linear op reads a new folded kernel Const, and the batch norm
node becomes BiasAdd(linear op, new bias Const) under its own name.
"""

import numpy as np

from tf_bnfuse import fold_math
from tf_bnfuse import graph as graph_lib
from tf_bnfuse import report as report_lib
from tf_bnfuse.passes import linear_ops

NAME = "fold_batch_norm"
BATCH_NORM_OPS = ("FusedBatchNorm", "FusedBatchNormV2", "FusedBatchNormV3")
PARAM_NAMES = ("scale", "offset", "mean", "variance")


def affine_of(index, node):
    """(scale, shift) of an inference batch norm; raises NoMatch when it has none."""
    # is_training defaults to true when the attr is absent.
    if "is_training" not in node.attr or node.attr["is_training"].b:
        raise linear_ops.NoMatch("training mode (is_training=true)")
    used_side_outputs = sorted(p for p in index.ports_in_use(node.name) if p != 0)
    if used_side_outputs:
        raise linear_ops.NoMatch("its statistics outputs %s are used" % used_side_outputs)
    data_inputs = [i for i in node.input if not i.startswith("^")]
    params = []
    for param_name, input_str in zip(PARAM_NAMES, data_inputs[1:5]):
        value = index.const_value(input_str)
        if value is None:
            raise linear_ops.NoMatch("%s (%s) is not constant" % (param_name, input_str))
        if not np.all(np.isfinite(value)):
            raise linear_ops.NoMatch("%s (%s) has NaN or Inf values" % (param_name, input_str))
        params.append(value)
    epsilon = node.attr["epsilon"].f if "epsilon" in node.attr else 1e-4
    return fold_math.batch_norm_to_affine(*params, epsilon)


def _check_compatible(node, match, scale):
    data_format = graph_lib.attr_string(node, "data_format", "NHWC")
    bn_axis = 1 if data_format.startswith("NC") else -1
    if bn_axis != match.channel_axis:
        raise linear_ops.NoMatch("data_format %s does not match %s %s" % (
            data_format, match.linear.op, match.linear.name))
    if scale.shape != (match.out_channels,):
        raise linear_ops.NoMatch("has %d channels but %s has %d output channels" % (
            scale.size, match.linear.name, match.out_channels))


def run(graph_def, outputs):
    index = graph_lib.GraphIndex(graph_def, outputs)
    editor = graph_lib.GraphEditor(graph_def)
    report = report_lib.PassReport(NAME, nodes_before=len(graph_def.node))
    for node in graph_def.node:
        if node.op not in BATCH_NORM_OPS:
            continue
        try:
            scale, shift = affine_of(index, node)
            match = linear_ops.match_linear_chain(index, node.input[0])
            _check_compatible(node, match, scale)
            folded = linear_ops.fold_weights(match, scale, shift)
        except linear_ops.NoMatch as reason:
            report.skips.append(report_lib.Skip(node.name, node.op, str(reason)))
            continue
        linear_ops.emit_fold(editor, match, folded, node.name, index=index)
        report.folds.append(report_lib.Fold(node.name, node.op, match.linear.name,
                                            match.op_description, match.absorbed))
    report.nodes_after = len(editor.graph_def.node)
    return editor.graph_def, report
