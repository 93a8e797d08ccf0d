"""lower_batch_norm: a batch norm no fold took stays one op, in the one form every runtime takes.

Measured on TensorFlow 2.21 (docs/folding.md): the TFLite converter converts an
inference FusedBatchNormV3 (and V1) that cannot fold, and fails outright on FusedBatchNormV2;
BatchNormWithGlobalNormalization cannot even be imported into a graph of GraphDef version 9 or
later, which the written model is. On TensorFlow's CPU kernels FusedBatchNormV3 is as fast as
a constant Mul + AddV2, or faster (oneDNN). So:

- FusedBatchNormV3 stays as it is;
- FusedBatchNorm and FusedBatchNormV2 in inference mode become FusedBatchNormV3 with the same
  inputs and attributes (the same outputs at the same ports; V3 adds one it does not read);
- BatchNormWithGlobalNormalization with constant parameters becomes FusedBatchNormV3 of new
  float32 constants (gamma, or ones without scale_after_normalization; beta; mean; variance).

The node keeps its name, so its consumers and any signature output are unchanged. Reported
as "rewritten". Runtimes that want the input's op keep it with a pipeline without this pass
(configs/keep_batch_norm.json).
"""

import numpy as np
import tensorflow as tf

from tf_bnfuse import graph as graph_lib
from tf_bnfuse import report as report_lib
from tf_bnfuse.passes import grammar

NAME = "lower_batch_norm"
TARGET = "FusedBatchNormV3"
_FUSED_ATTRS = ("T", "U", "epsilon", "data_format", "exponential_avg_factor")


def run(context, graph_def, outputs):
    index = context.index(graph_def, outputs)
    editor = context.editor(graph_def)
    report = report_lib.PassReport(NAME, nodes_before=len(graph_def.node))
    for node in graph_def.node:
        if node.name not in index.live or node.op not in ("FusedBatchNorm", "FusedBatchNormV2",
                                                           "BatchNormWithGlobalNormalization"):
            continue
        if node.op == "BatchNormWithGlobalNormalization":
            rewritten = _from_global_normalization(index, editor, node)
        else:
            rewritten = _from_fused(editor, node)
        if rewritten:
            report.lowered.append(report_lib.Lowered(node.name, node.op, TARGET))
    report.nodes_after = len(editor.graph_def.node)
    return editor.graph_def, report


def _from_fused(editor, node):
    """FusedBatchNorm / V2 in inference mode -> V3 under the same name; False when left alone."""
    if grammar.is_training(node):
        return False
    attrs = {key: node.attr[key] for key in _FUSED_ATTRS if key in node.attr}
    attrs.setdefault("U", graph_lib.type_attr(tf.float32))  # V1 has float32 parameters and no U
    attrs["is_training"] = tf.compat.v1.AttrValue(b=False)
    editor.replace_node(node.name, TARGET, graph_lib.data_inputs(node), attrs)
    return True


def _from_global_normalization(index, editor, node):
    """BatchNormWithGlobalNormalization (inputs t, m, v, beta, gamma) with constant parameters -> V3
    of float32 constants; False when its parameters are not constant."""
    inputs = graph_lib.data_inputs(node)
    values = [index.const_value(i) for i in inputs[1:5]]
    if any(v is None for v in values):
        return False
    mean, variance, beta, gamma = (np.asarray(v, np.float32) for v in values)
    if not node.attr["scale_after_normalization"].b:
        gamma = np.ones_like(gamma)
    params = [editor.add_const("%s/%s_rewritten" % (node.name, name), value, tf.float32)
              for name, value in (("scale", gamma), ("offset", beta), ("mean", mean), ("variance", variance))]
    attrs = {"T": node.attr["T"], "U": graph_lib.type_attr(tf.float32),
             "epsilon": tf.compat.v1.AttrValue(f=node.attr["variance_epsilon"].f),
             "data_format": graph_lib.string_attr("NHWC"), "is_training": tf.compat.v1.AttrValue(b=False)}
    editor.replace_node(node.name, TARGET, [inputs[0]] + params, attrs)
    return True

