"""Model Explorer node data for a written .tflite model (--explorer_data): each op a fold made,
coloured by its own check's error over its bound, and each op of a batch norm left alone,
coloured by why (docs/tflite.md, "Drawn in Model Explorer").

Model Explorer keys node data by graph id (a .tflite subgraph's name) and by a node's output
tensor name. The converter names each op's output after every TensorFlow op it came from,
joined by ";" (a conv with its folded bias and activation names all three), and its constant
inputs after the op that reads them; a fold is found there by its batch norm's or linear op's
name. Its SavedModel adapter numbers a function's nodes by position and a SavedModel's function
names change with every save, so the data is drawn on the .tflite only.
"""

import json

from tf_bnfuse.graph import tf_internal
from tf_bnfuse.passes import left_alone

NAME = "tf_bnfuse: fold error / bound"
# A fold's value is its check's error over its bound: at most 1 passes (a run with a fold past
# it writes nothing). Model Explorer colours a value by the first threshold at or above it.
FOLD_THRESHOLDS = [(0.1, "#1b7837"), (0.5, "#7fbf7b"), (1.0, "#f1a340"), (float("inf"), "#d73027")]
NOT_A_CHECK = -1  # the value of a fold not checked by itself, and of a batch norm left alone
UNCHECKED_FOLD = "#bdbdbd"
# (what a reason says, the colour of the batch norms left alone for it), first match wins
LEFT_ALONE_COLOURS = [
    (left_alone.TRAINING_MODE, "#762a83"),
    ("consumers", "#2166ac"),  # its intermediate tensor has another consumer
    ("not constant", "#35978f"),
    ("not from a supported linear op", "#8c510a"),
    ("", "#bf812d"),
]


def node_data(content, report):
    """The node-data JSON (bytes) of a .tflite model's content, from the RunReport of the run that
    wrote it, and (drawn, not drawn): how many folds and batch norms left alone name an op."""
    subgraphs, signatures = tf_internal.tflite_subgraphs(content)
    checks = report.verification.folds if report.verification is not None else None
    excess = {(c.signature, c.node): c.excess for c in checks.checks} if checks is not None else {}
    by_subgraph = {index: key for key, index in signatures.items()}
    data, drawn, wanted = {}, set(), set()
    for index, (name, ops) in enumerate(subgraphs):
        key = by_subgraph.get(index)
        marks = _marks(report.signatures, excess, key)
        wanted.update(m[0] for m in marks)
        results = {}
        for outputs, constants in ops:
            mark = _mark_of(marks, outputs, constants)
            if mark is not None and outputs:
                drawn.add(mark[0])
                results[outputs[0]] = mark[1]
        if results:
            data[name] = {"name": NAME, "results": results,
                          "thresholds": [{"value": v, "bgColor": colour} for v, colour in FOLD_THRESHOLDS]}
    return json.dumps(data, indent=1).encode(), (len(drawn), len(wanted - drawn))


def _marks(graph_reports, excess, key):
    """[(identity, result, names it goes by, names only of its constant inputs)] of the folds, then
    the batch norms left alone, of signature `key`'s subgraph; for a subgraph of no signature (a
    loop body, a branch), the folds in every signature's called functions."""
    marks = []
    for signature, graph in graph_reports.items():
        owner = graph.same_as or signature  # a signature folded with another: its folds and checks
        graph = graph_reports[owner]
        for fold in graph.folds:
            in_function = fold.check is not None and fold.check.function is not None
            if signature == key or (key is None and in_function):
                value = excess.get((owner, fold.node))
                result = ({"value": value} if value is not None
                          else {"value": NOT_A_CHECK, "bgColor": UNCHECKED_FOLD})
                marks.append(((signature, "fold", fold.node), result, [fold.node, fold.linear_node],
                              [fold.linear_node]))
        if signature == key:
            for entry in graph.left_alone:
                colour = next(c for said, c in LEFT_ALONE_COLOURS if said in entry.reason)
                marks.append(((signature, "left alone", entry.name), {"value": NOT_A_CHECK, "bgColor": colour},
                              [entry.name] + [op.node for op in entry.ops], []))
    return marks


def _mark_of(marks, outputs, constants):
    """The first mark whose names one of an op's output tensors carries (or whose linear op names
    one of its constant inputs: a fold's kernel, where the op's output is a signature output)."""
    carried = _components(outputs)
    constant = _components(constants)
    for mark in marks:
        if any(_names(component, name) for name in mark[2] for component in carried) or \
                any(_names(component, name) for name in mark[3] for component in constant):
            return mark
    return None


def _components(tensor_names):
    return [part for name in tensor_names for part in name.split(";") if part]


def _names(component, name):
    """Whether a tensor name's component is the TensorFlow op `name`, an op in its name scope, or
    either with the digits the converter appends to keep tensor names unique."""
    if component == name or component.startswith(name + "/"):
        return True
    return component.startswith(name) and component[len(name):].isdigit()
