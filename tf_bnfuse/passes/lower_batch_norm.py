"""lower_batch_norm: an inference batch norm no fold took -> a constant per-channel Mul + AddV2.

A FusedBatchNorm that cannot fold (after a ReLU, say) makes the TFLite converter fail
outright; as `x * scale + shift` with constant vectors it converts, and every runtime
runs it. Taken: inference mode, constant finite parameters, statistics outputs unused
(the same conditions as a fold, grammar.STEPS). The batch norm's name goes to the AddV2,
so its consumers and any signature output are unchanged. Reported as "lowered".

Runtimes that prefer the fused op keep it with a pipeline without this pass
(configs/keep_batch_norm.json).
"""

from tf_bnfuse import graph as graph_lib
from tf_bnfuse import report as report_lib
from tf_bnfuse.passes import grammar
from tf_bnfuse.passes.emit import check_representable

NAME = "lower_batch_norm"


def _layout(index, node):
    """The Layout a batch norm's own attributes give its input."""
    channels = int(index.const_shape(grammar.data_inputs(node)[1])[0])
    dtype = graph_lib.node_dtype(node)
    if graph_lib.attr_string(node, "data_format", "NHWC").startswith("NC"):
        rank = len(graph_lib.attr_string(node, "data_format"))
        return grammar.Layout(rank=rank, channel=1, channels=channels, dtype=dtype)
    return grammar.Layout(rank=None, channel=-1, channels=channels, dtype=dtype)


def run(context, graph_def, outputs):
    index = context.index(graph_def, outputs)
    editor = context.editor(graph_def)
    report = report_lib.PassReport(NAME, nodes_before=len(graph_def.node))
    for node in graph_def.node:
        if node.op not in grammar.BATCH_NORM_OPS or node.name not in index.live:
            continue
        try:
            if index.const_shape(grammar.data_inputs(node)[1]) is None:
                raise grammar.NoMatch("its scale is not constant")
            layout = _layout(index, node)
            scale, shift = grammar.STEPS[node.op].affine(index, node, layout)
            check_representable(scale, layout.dtype, "scale of " + node.name)
            check_representable(shift, layout.dtype, "shift of " + node.name)
        except grammar.NoMatch:
            continue  # stays as it is; fold_batch_norm has reported why it did not fold
        shape = [-1] if layout.rank is None else [-1] + [1] * (layout.rank - 2)
        t = {"T": graph_lib.type_attr(layout.dtype)}
        scale_const = editor.add_const(node.name + "/scale_lowered", scale.reshape(shape), layout.dtype)
        shift_const = editor.add_const(node.name + "/shift_lowered", shift.reshape(shape), layout.dtype)
        mul = editor.add_node(editor.unique_name(node.name + "/mul_lowered"), "Mul",
                              [grammar.data_inputs(node)[0], scale_const], t)
        editor.replace_node(node.name, "AddV2", [mul.name, shift_const], t)
        report.lowered.append(report_lib.Lowered(node.name, node.op, "Mul + AddV2"))
    report.nodes_after = len(editor.graph_def.node)
    return editor.graph_def, report
