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

from tf_bnfuse import graph as graph_lib
from tf_bnfuse.graph import const_eval
from tf_bnfuse.graph import tf_internal
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
    def decide(node):
        if node.op == "Const":
            return True
        op_def = tf_internal.op_def(node.op)
        if node.op in NEVER_EVALUATED or op_def is None or op_def.is_stateful or not node.input:
            return False
        return None  # when all of its inputs are
    return graph_lib.qualifying_nodes(graph_def, decide)


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
            total += graph_lib.const_nbytes(node, index.weights)
        stack.extend(graph_lib.parse_input(i)[0] for i in node.input)
    return total


def _evaluate(graph_def, index, tensors):
    """Runs the constant subgraph; returns {tensor name: (value, tf.DType)}, failures left out.

    Only the cone of `tensors` is copied into the session's graph: the other
    constants (the weights, mostly) would cost time and memory for nothing.
    """
    cone = graph_lib.cone(index.node, tensors)
    sub = graph_lib.new_graph_def(graph_def)
    for node in graph_def.node:
        if node.name in cone:
            copy = sub.node.add()
            copy.CopyFrom(node)
            copy.device = ""
            if graph_lib.WEIGHT_KEY_ATTR in copy.attr:  # TensorFlow reads the bytes from the proto
                index.weights.restore_node(copy)
            graph_lib.set_inputs(copy, graph_lib.data_inputs(node))
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


def run(context, graph_def, outputs, always_fold_bytes=4096):
    index = context.index(graph_def, outputs)
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

    editor = context.editor(graph_def)
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
