"""prune_identities: consumers of a plain Identity or a NoOp read what it forwards.

Freezing inlines every function call, and each inlined call leaves an
Identity per argument and per result, and a NoOp that gathers its control
outputs: a one-conv Keras model gains five of them. A consumer of
`Identity(x)` reads `x` instead; a control edge from a NoOp becomes control
edges from the NoOp's own control inputs. Kept: signature outputs (their
names are the signature's), an Identity with control inputs (it orders a
read after a write), and IdentityN/Snapshot/StopGradient. The bypassed nodes
are left for cleanup.
"""

from tf_bnfuse import graph as graph_lib
from tf_bnfuse import report as report_lib

NAME = "prune_identities"
# Nodes one redundant-control-edge check may visit: bounds the pass on graphs where
# many nodes carry control edges (keeping an edge is always correct).
_MAX_ANCESTOR_WALK = 10000


def run(context, graph_def, outputs):
    index = context.index(graph_def, outputs)
    protected = {name for name, _ in index.output_tensors}
    identities = {n.name: n for n in graph_def.node
                  if n.op == "Identity" and n.name not in protected and len(n.input) == 1
                  and not graph_lib.is_control(n.input[0])}
    noops = {n.name: n for n in graph_def.node if n.op == "NoOp" and n.name not in protected}
    report = report_lib.PassReport(NAME, nodes_before=len(graph_def.node))
    if not identities and not noops:
        report.nodes_after = len(graph_def.node)
        return graph_def, report

    control_sources = {}

    editor = context.editor(graph_def)
    bypassed = set()
    for node in graph_def.node:
        if node.name not in index.live or node.name in identities or node.name in noops:
            continue
        new_inputs = []
        for input_str in node.input:
            name, _, is_control = graph_lib.parse_input(input_str)
            replacement = (_controls(name, identities, noops, control_sources) if is_control
                           else [_source(input_str, identities)])
            if replacement != [input_str]:
                bypassed.add(name)
            new_inputs.extend(replacement)
        data = graph_lib.data_inputs(new_inputs)
        # A control edge from a node the data already waits for, or a repeated one, orders nothing.
        control = list(dict.fromkeys(graph_lib.control_inputs(new_inputs)))
        if control:
            waited_for = _data_ancestors(index, data, {i[1:] for i in control})
            control = [i for i in control if i[1:] not in waited_for]
        if data + control != list(node.input):
            graph_lib.set_inputs(editor.node(node.name), data + control)
    report.nodes_after = len(editor.graph_def.node)
    report.note = "%d Identity/NoOp nodes bypassed" % len(bypassed & (set(identities) | set(noops)))
    return editor.graph_def, report


def _source(input_str, identities):
    """The tensor an input reads once Identity chains are bypassed."""
    return graph_lib.forwarded_input(input_str, identities.get)


def _controls(name, identities, noops, memo):
    """The control inputs that stand for a control edge from `name`.

    (A module function, not a closure: a recursive closure is a reference cycle, and this
    one would hold the graph's nodes, and so the whole GraphDef, until the cyclic collector
    ran; it is paused while the passes run.)
    """
    if name in memo:
        return memo[name]
    memo[name] = []  # a cycle of NoOps orders nothing more
    if name in identities:
        result = ["^" + graph_lib.parse_input(_source(name, identities))[0]]
    elif name in noops:
        result = []
        for input_str in noops[name].input:
            result.extend(_controls(graph_lib.parse_input(input_str)[0], identities, noops, memo))
    else:
        result = ["^" + name]
    memo[name] = result
    return result


def _data_ancestors(index, data_inputs, wanted):
    """The nodes of `wanted` that the data inputs depend on, through data and control edges.

    Walks up from the data inputs and stops once every wanted node is found;
    only nodes with control inputs (few: outputs of inlined calls) ask.
    """
    found, seen = set(), set()
    stack = [graph_lib.parse_input(i)[0] for i in data_inputs]
    while stack and found != wanted:
        if len(seen) >= _MAX_ANCESTOR_WALK:
            return found  # the rest keep their control edges: kept is always safe
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in wanted:
            found.add(name)
        node = index.node(name)
        if node is not None:
            stack.extend(graph_lib.parse_input(i)[0] for i in node.input)
    return found
