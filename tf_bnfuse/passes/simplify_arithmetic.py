"""simplify_arithmetic: x * 1, x / 1, x + 0 and x - 0 by a constant become x.

Keras' and TF's swish is `x * sigmoid(beta * x)` with `beta = 1.0`: a Mul by
one after every activation (49 in EfficientNetB0), which also stops folds and
fills reports. The node becomes Identity(x) under its own name, so consumers
and a signature output that names it are unchanged (prune_identities then
bypasses it).

Only a scalar constant, of the node's dtype, is taken: a scalar broadcasts
without changing x's shape, which a constant of another shape could. `1 / x`,
`0 - x`, and a constant that is not exactly the identity element are left
alone. (`x + 0` is x but for the sign of a zero: -0 + 0 is +0, equal to -0.)
"""

import numpy as np

from tf_bnfuse import graph as graph_lib
from tf_bnfuse import report as report_lib

NAME = "simplify_arithmetic"
# op -> (identity element, positions the constant may take: x op c, and c op x for commutative ops)
_IDENTITY_ELEMENTS = {
    "Mul": (1, (0, 1)),
    "RealDiv": (1, (1,)),
    "Div": (1, (1,)),
    "Add": (0, (0, 1)),
    "AddV2": (0, (0, 1)),
    "Sub": (0, (1,)),
}


def _passed_input(index, node):
    """The data input that the node returns unchanged, or None."""
    identity, positions = _IDENTITY_ELEMENTS[node.op]
    data = graph_lib.data_inputs(node)
    if len(data) != 2:
        return None
    dtype = graph_lib.node_dtype(node)
    for position in positions:
        const = index.const_node(data[position])
        other = data[1 - position]
        # Only a scalar can be taken: its shape says so without reading a (big) value.
        if const is None or const.attr["value"].tensor.tensor_shape.dim or index.const_node(other) is not None:
            continue
        value = index.const_value(data[position])
        if np.ndim(value) == 0 and graph_lib.node_dtype(const, "dtype") == dtype and value == identity:
            return other
    return None


def run(context, graph_def, outputs):
    index = context.index(graph_def, outputs)
    editor = context.editor(graph_def)
    report = report_lib.PassReport(NAME, nodes_before=len(graph_def.node))
    simplified = 0
    for node in graph_def.node:
        if node.op not in _IDENTITY_ELEMENTS or node.name not in index.live:
            continue
        passed = _passed_input(index, node)
        if passed is None:
            continue
        editor.replace_node(node.name, "Identity", [passed], {"T": node.attr["T"]})
        simplified += 1
    report.nodes_after = len(editor.graph_def.node)
    report.note = "%d x*1, x/1, x+0, x-0 removed" % simplified
    return editor.graph_def, report
