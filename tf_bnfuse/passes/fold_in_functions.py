"""fold_in_functions: the fold passes inside While bodies and If branches.

A frozen graph keeps `While`/`If` functional (their bodies are FunctionDefs in the
library), and a conv inside a body reads its kernel as a function argument: the frozen
weight is a Const outside, passed in through the loop. Here each body or branch is turned
into a GraphDef, the arguments whose value is fixed become Consts (an If's constant input;
a While's constant input that the body passes on unchanged: loop-invariant), the fold
passes run on it (`passes` option), and the result goes back into the FunctionDef under
the same name and signature. The While/If node, its inputs and its attributes are not
touched; the folded kernel is a Const inside the body (the argument stays, unused).

Taken only where the function is called by exactly this one node (anything else would see
the same rewritten body with other arguments). Folds are reported with the function's
name before the node's: `<function>/<node>`.
"""

import dataclasses

import tensorflow as tf

from tf_bnfuse import graph as graph_lib
from tf_bnfuse import report as report_lib
from tf_bnfuse.graph import tf_internal
from tf_bnfuse.passes import runner

NAME = "fold_in_functions"
INNER_PIPELINE = ["constant_folding", "simplify_arithmetic", "fold_batch_norm", "fold_affine", "fold_forward",
                  "lower_batch_norm"]
# op -> (the function attributes folded: a While's body, an If's branches; whether it loops)
_CONTROL_FLOW = {**{op: (("body",), True) for op in graph_lib.WHILE_OPS},
                 **{op: (("then_branch", "else_branch"), False) for op in graph_lib.IF_OPS}}


def run(context, graph_def, outputs, passes=None):
    inner = passes if passes is not None else INNER_PIPELINE
    report = report_lib.PassReport(NAME, nodes_before=len(graph_def.node))
    index = context.index(graph_def, outputs)
    callers = graph_lib.call_counts(graph_def)
    library = graph_lib.functions_by_name(graph_def)
    rewritten = {}
    for node in graph_def.node:
        if node.op not in _CONTROL_FLOW or node.name not in index.live:
            continue
        attrs, loop = _CONTROL_FLOW[node.op]
        inputs = graph_lib.data_inputs(node)[graph_lib.CALL_ARGUMENTS[node.op][1]:]
        for attr in attrs:
            name = node.attr[attr].func.name
            function = index.function(name)
            if function is None or callers.get(name) != 1 or name in rewritten:
                continue
            constants = {k: index.const_value(i) for k, i in enumerate(inputs)}
            try:
                folded, reports = _fold_function(context, function, constants, loop, inner, library)
            except (ValueError, KeyError, TypeError) as e:  # a body this pass cannot read as a graph
                report.skips.append(report_lib.Skip(name, node.op, "body not folded: %s" % e))
                continue
            _add_inner_reports(report, name, reports)
            if folded is not None:
                rewritten[name] = folded
    if not rewritten:
        report.nodes_after = len(graph_def.node)
        return graph_def, report
    result = graph_lib.copy_graph_def(graph_def)
    for function in result.library.function:
        if function.signature.name in rewritten:
            function.CopyFrom(rewritten[function.signature.name])
    report.nodes_after = len(result.node)
    return result, report


def _add_inner_reports(report, name, reports):
    """Adds the folds, skips and lowered batch norms of a body's passes, named `<function>/<node>`."""
    for pass_report in reports:
        report.folds += [report_lib.Fold("%s/%s" % (name, f.node), f.op, "%s/%s" % (name, f.linear_node),
                                         f.linear_op, ["%s/%s" % (name, a) for a in f.absorbed],
                                         f.check and dataclasses.replace(f.check, function=name))
                         for f in pass_report.folds]
        report.skips += [report_lib.Skip("%s/%s" % (name, s.node), s.op, s.reason) for s in pass_report.skips]
        report.lowered += [report_lib.Lowered("%s/%s" % (name, x.node), x.op, x.into)
                           for x in pass_report.lowered]


def _fold_function(context, function, constants, loop, inner, library):
    """(the folded FunctionDef or None if nothing folded, [PassReport])."""
    graph_def, nested_to_flat = tf_internal.function_def_to_graph_def(function)
    arguments = [a.name for a in function.signature.input_arg]
    by_name = {n.name: n for n in graph_def.node}
    returned = {a.name: nested_to_flat[function.ret[a.name]] for a in function.signature.output_arg}
    fixed = []
    for k, argument in enumerate(arguments):
        value = constants.get(k)
        if value is None or (loop and not _passed_on(by_name, returned, function.signature.output_arg, k, argument)):
            continue
        placeholder = by_name[argument]
        dtype = placeholder.attr["dtype"].type
        placeholder.op = "Const"
        placeholder.ClearField("attr")
        placeholder.attr["dtype"].type = dtype
        placeholder.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(value, dtype=tf.as_dtype(dtype)))
        fixed.append(argument)
    if not fixed:
        return None, []
    stateful = [n.name for n in graph_def.node if _is_stateful(n)]
    control = [function.control_ret[k] for k in function.control_ret]
    keep = list(returned.values()) + control + stateful
    # The same runner as the pipeline's, with a store of the body's own (written back at its end).
    current, reports = runner.run_pipeline(graph_def, keep, inner + ["cleanup"], owns_input=True,
                                           context=context.nested(function.signature.name))
    if not any(r.folds or r.lowered for r in reports):
        return None, reports
    return _to_function_def(function, current, arguments, returned, library), reports


def _passed_on(by_name, returned, output_args, k, argument):
    """Whether a While body returns argument k unchanged as its output k (loop-invariant)."""
    if k >= len(output_args):
        return False
    source = graph_lib.forwarded_input(returned[output_args[k].name], by_name.get, ops=("Identity",))
    return graph_lib.parse_input(source)[:2] == (argument, 0)


def _is_stateful(node):
    op_def = tf_internal.op_def(node.op)
    return op_def is None or op_def.is_stateful  # a call of a library function counts as stateful


def _to_function_def(original, graph_def, arguments, returned, library):
    """The FunctionDef of `original`'s signature whose body is graph_def (flat tensor names)."""
    nodes = {n.name: n for n in graph_def.node}

    def nested(flat):
        name, port, is_control = graph_lib.parse_input(flat)
        if is_control:
            return flat
        if name in arguments:
            return name
        op = nodes[name].op
        op_def = library[op].signature if op in library else tf_internal.op_def(op)
        position = 0
        for output in op_def.output_arg:
            count = 1
            if output.number_attr:
                count = nodes[name].attr[output.number_attr].i
            elif output.type_list_attr:
                count = len(nodes[name].attr[output.type_list_attr].list.type)
            if port < position + count:
                return "%s:%s:%d" % (name, output.name, port - position)
            position += count
        raise ValueError("%s has no output %d" % (name, port))

    result = type(original)()  # a FunctionDef (no public class)
    result.CopyFrom(original)
    del result.node_def[:]
    for node in graph_def.node:
        if node.name in arguments:
            continue
        new = tf.compat.v1.NodeDef()
        new.CopyFrom(node)
        del new.input[:]
        new.input.extend(nested(i) for i in node.input)
        result.node_def.append(new)
    for output, flat in returned.items():
        result.ret[output] = nested(flat)
    return result
