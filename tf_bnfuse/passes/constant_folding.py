"""constant_folding: replaces nodes computed only from constants by a Const.

Keras 3 computes a batch norm's scale and offset at run time from the moving
statistics (Rsqrt, Mul, Sub on variable reads), and reshapes a conv's bias
through Reshape/Squeeze. After freezing those are all constant; this pass
evaluates them, so the batch norm becomes Mul(x, Const) and AddV2(x, Const).

Only the frontier is materialized: a constant-computable node that a
non-constant node (or a graph output) reads. Identity and NoOp nodes are
looked through, never copied. A node is computable when its op is stateless,
it is not control flow or a function call, and all of its inputs (control
inputs included) are computable. A result is only materialized when it is no
bigger than the constants it is computed from, or than `always_fold_bytes`,
so a small op on a big constant (Tile, Fill, BroadcastTo) is never turned into
a bigger Const.
"""

import numpy as np
import tensorflow as tf
from tensorflow.python.framework import op_def_registry

from tf_bnfuse.graph import const_eval
from tf_bnfuse import graph as graph_lib
from tf_bnfuse import report as report_lib

NAME = "constant_folding"
NEVER_EVALUATED = frozenset({
    "Placeholder", "PlaceholderWithDefault", "Enter", "Exit", "Merge", "Switch", "NextIteration",
    "LoopCond", "RefEnter", "RefExit", "RefMerge", "RefSwitch", "PartitionedCall",
    "StatefulPartitionedCall", "If", "While", "StatelessIf", "StatelessWhile", "StatelessCase", "Case",
    "Assert", "Print", "PrintV2", "_Arg", "_Retval"})
LOOKED_THROUGH = graph_lib.IDENTITY_OPS | {"NoOp"}
UNMATERIALIZABLE_DTYPES = (tf.resource, tf.variant)


def _evaluable(graph_def):
    """Names of the nodes whose value is fixed by constants alone."""
    nodes = {node.name: node for node in graph_def.node}
    result = {}
    for start in nodes:
        stack = [start]
        on_stack = {start}
        while stack:
            name = stack[-1]
            node = nodes.get(name)
            if node is None or name in result:
                result.setdefault(name, False)
                stack.pop()
                on_stack.discard(name)
                continue
            op_def = op_def_registry.get(node.op)
            if node.op == "Const":
                result[name] = True
            elif node.op in NEVER_EVALUATED or op_def is None or op_def.is_stateful:
                result[name] = False
            else:
                sources = {graph_lib.parse_input(i)[0] for i in node.input}
                # (Not `sources - result.keys()`: that walks all of result each time.)
                pending = {s for s in sources if s not in result and s not in on_stack}
                if pending:
                    stack.extend(pending)
                    on_stack |= pending
                    continue
                # A cycle (a loop) back onto the stack is not constant.
                result[name] = bool(node.input) and all(result.get(s, False) for s in sources)
            stack.pop()
            on_stack.discard(name)
    return {name for name, ok in result.items() if ok}


def _cone_const_bytes(index, name):
    """Bytes of the distinct Const nodes a node is computed from."""
    seen, stack, total = set(), [name], 0
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        node = index.node(current)
        if node.op == "Const":
            total += graph_lib.const_nbytes(node)
        stack.extend(graph_lib.parse_input(i)[0] for i in node.input)
    return total


def _cone(index, tensors):
    """Names of the nodes the given tensors are computed from (control inputs included)."""
    seen = set()
    stack = [graph_lib.parse_input(t)[0] for t in tensors]
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        stack.extend(graph_lib.parse_input(i)[0] for i in index.node(name).input)
    return seen


def _evaluate(graph_def, index, tensors):
    """Runs the constant subgraph; returns {tensor name: (value, tf.DType)}, failures left out.

    Only the cone of `tensors` is copied into the session's graph: the other
    constants (the weights, mostly) would cost time and memory for nothing.
    """
    cone = _cone(index, tensors)
    sub = tf.compat.v1.GraphDef()
    sub.versions.CopyFrom(graph_def.versions)
    sub.library.CopyFrom(graph_def.library)
    for node in graph_def.node:
        if node.name in cone:
            copy = sub.node.add()
            copy.CopyFrom(node)
            copy.device = ""
            if graph_lib.WEIGHT_KEY_ATTR in copy.attr:  # TensorFlow reads the bytes from the proto
                graph_lib.restore_node(copy)
            data_inputs = [i for i in node.input if not i.startswith("^")]
            del copy.input[:]
            copy.input.extend(data_inputs)
    graph = tf.Graph()
    with graph.as_default():
        tf.compat.v1.import_graph_def(sub, name="")
    results = {}
    with tf.compat.v1.Session(graph=graph) as session:
        fetches = [graph.get_tensor_by_name(t) for t in tensors
                   if graph.get_tensor_by_name(t).dtype not in UNMATERIALIZABLE_DTYPES]
        try:
            values = session.run(fetches)
            return {f.name: (v, f.dtype) for f, v in zip(fetches, values)}
        except tf.errors.OpError:
            pass
        for fetch in fetches:  # one by one, keeping what works
            try:
                results[fetch.name] = (session.run(fetch), fetch.dtype)
            except tf.errors.OpError:
                continue
    return results


def run(graph_def, outputs, always_fold_bytes=4096):
    index = graph_lib.index_of(graph_def, outputs)
    report = report_lib.PassReport(NAME, nodes_before=len(graph_def.node))
    evaluable = _evaluable(graph_def)

    frontier = []  # (node name, [ports read from outside the constant subgraph])
    for node in graph_def.node:
        if node.name not in evaluable or node.op == "Const" or node.op in LOOKED_THROUGH:
            continue
        ports = sorted(p for p in index.ports_in_use(node.name)
                       if index.is_output(node.name, p)
                       or any(c not in evaluable for c, _ in index.data_consumers(node.name, p)))
        if ports:
            frontier.append((node.name, ports))

    editor = graph_lib.GraphEditor(graph_def)
    materialized = 0
    if frontier:
        tensors = ["%s:%d" % (name, p) for name, ports in frontier for p in ports]
        values = {}
        for tensor in tensors:
            value = const_eval.evaluate(index, tensor)
            if value is not None:
                values[tensor] = (value, tf.as_dtype(value.dtype))
        rest = [t for t in tensors if t not in values]
        if rest:
            values.update(_evaluate(graph_def, index, rest))
        for name, ports in frontier:
            node = index.node(name)
            port_values = {p: values.get("%s:%d" % (name, p)) for p in ports}
            if any(v is None for v in port_values.values()):
                report.skips.append(report_lib.Skip(name, node.op, "could not be evaluated"))
                continue
            size = sum(np.asarray(v).nbytes for v, _ in port_values.values())
            limit = max(always_fold_bytes, _cone_const_bytes(index, name))
            if size > limit:
                report.skips.append(report_lib.Skip(
                    name, node.op, "result (%d bytes) is bigger than the constants it comes from" % size))
                continue
            _materialize(editor, index, node, port_values)
            materialized += 1
    report.nodes_after = len(editor.graph_def.node)
    report.note = "%d nodes replaced by constants" % materialized
    return editor.graph_def, report


def _materialize(editor, index, node, port_values):
    """Turns node into a Const in place (only port 0 read), or adds one Const per read port."""
    if list(port_values) == [0]:
        value, dtype = port_values[0]
        target = editor.node(node.name)
        target.ClearField("input")
        target.ClearField("attr")
        target.op = "Const"
        target.attr["dtype"].type = dtype.as_datatype_enum
        target.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(value, dtype=dtype))
        return
    for port, (value, dtype) in port_values.items():
        const_name = editor.add_const("%s/output_%d_folded" % (node.name, port), value, dtype)
        for consumer, position in index.data_consumers(node.name, port):
            editor.node(consumer).input[position] = const_name
