"""The function library: which functions a node calls, with which arguments, and their closure."""

from tf_bnfuse.graph import tf_internal
from tf_bnfuse.graph import walks
from tf_bnfuse.graph.names import data_inputs

# The ops that call one function by their `f` attr, with the node's inputs as its arguments.
CALL_OPS = frozenset({"PartitionedCall", "StatefulPartitionedCall"})
# Call-like ops: node input i is argument (i - offset) of each function attr named here.
CALL_ARGUMENTS = {
    "PartitionedCall": (("f",), 0),
    "StatefulPartitionedCall": (("f",), 0),
    "While": (("body", "cond"), 0),
    "StatelessWhile": (("body", "cond"), 0),
    "If": (("then_branch", "else_branch"), 1),
    "StatelessIf": (("then_branch", "else_branch"), 1),
    "Case": (("branches",), 1),
    "StatelessCase": (("branches",), 1),
}
WHILE_OPS = frozenset({"While", "StatelessWhile"})
IF_OPS = frozenset({"If", "StatelessIf"})


def called_function_names(node):
    """The names of the library functions a node's attributes name (a call's `f`, a While's
    `body` and `cond`, an If's branches, a Case's `branches`)."""
    found = [value.func.name for value in node.attr.values() if value.HasField("func")]
    return found + [f.name for value in node.attr.values() for f in value.list.func]


def called_functions(node, functions):
    """(function names, argument offset) of the functions a node calls with its inputs as
    arguments: a call op's, a control-flow op's, or the function named by its op; ((), 0)."""
    if node.op in functions:  # a function called by its own name
        return (node.op,), 0
    if node.op not in CALL_ARGUMENTS:
        return (), 0
    attrs, offset = CALL_ARGUMENTS[node.op]
    found = []
    for attr in attrs:
        value = node.attr[attr]
        if value.HasField("func"):
            found.append(value.func.name)
        found.extend(f.name for f in value.list.func)
    return tuple(found), offset


def functions_by_name(graph_def):
    return {f.signature.name: f for f in graph_def.library.function}


def function_closure(functions, names):
    """The names of `functions` ({name: FunctionDef}) among `names` and every function they
    call, directly or through calls inside them (by a func attr, or by a function's name as
    the op)."""
    def called(name):
        if name not in functions:
            return None
        return [f for node in functions[name].node_def for f in [node.op] + called_function_names(node)]
    return walks.reachable(names, called)


def call_counts(graph_def):
    """function name -> how many nodes (in the graph and in library functions) name it."""
    counts = {}
    nodes = list(graph_def.node) + [n for f in graph_def.library.function for n in f.node_def]
    for node in nodes:
        for name in called_function_names(node):
            counts[name] = counts.get(name, 0) + 1
    return counts


def body_source(by_name, input_str):
    """(node or argument name, output) that a function-body input reads through Identity
    nodes; function bodies name tensors "node:output:index" or an argument's bare name, and
    output is "" for an argument. by_name: the body's {name: NodeDef}."""
    name, _, output = input_str.partition(":")
    seen = set()
    while name in by_name and by_name[name].op == "Identity" and name not in seen:
        seen.add(name)
        name, _, output = by_name[name].input[0].partition(":")
    return name, output


def is_deterministic(graph_def):
    """Whether two runs of graph_def on the same inputs give the same outputs: no node, in the
    graph or any function of its library, is an op TensorFlow registers as stateful (a random
    op, a variable or table read or write) or does not know. Calls and control flow count by
    the functions they run, which are checked themselves."""
    library = {f.signature.name for f in graph_def.library.function}
    for node in list(graph_def.node) + [n for f in graph_def.library.function for n in f.node_def]:
        if node.op in library or node.op in CALL_ARGUMENTS:
            continue
        op_def = tf_internal.op_def(node.op)
        if op_def is None or op_def.is_stateful:
            return False
    return True


def renamed_functions(graph_def, suffix):
    """A copy of graph_def whose library functions are named with `suffix` added, and every
    reference to them (a func attr, a function called by its name as the op, a gradient) with
    them. Importing it cannot clash with another graph's function of the same name and another
    body (the original's loop body beside its folded one, in one process)."""
    result = type(graph_def)()
    result.CopyFrom(graph_def)
    names = {f.signature.name for f in result.library.function}
    if not names:
        return result

    def rename(node_defs):
        for node in node_defs:
            if node.op in names:
                node.op += suffix
            for value in node.attr.values():
                if value.HasField("func") and value.func.name in names:
                    value.func.name += suffix
                for function in value.list.func:
                    if function.name in names:
                        function.name += suffix
    rename(result.node)
    for function in result.library.function:
        function.signature.name += suffix
        rename(function.node_def)
    for gradient in result.library.gradient:
        if gradient.function_name in names:
            gradient.function_name += suffix
        if gradient.gradient_func in names:
            gradient.gradient_func += suffix
    return result


# Ops a function that only forwards its arguments to one call may hold besides that call (in a
# function's graph, not its FunctionDef, its arguments are Placeholders too).
FORWARDING_OPS = frozenset({"Identity", "NoOp"})


def forwarded_call(function_def):
    """(callee name, [for each callee argument: the index of the argument of function_def it is],
    [for each output of function_def: the callee output it is]) when function_def only calls one
    function with its own arguments and returns that call's outputs (a signature wrapper, a
    restored function's body); None otherwise."""
    by_name = {node.name: node for node in function_def.node_def}
    calls = [node for node in function_def.node_def if node.op in CALL_OPS]
    if len(calls) != 1 or any(n.op not in FORWARDING_OPS | CALL_OPS for n in function_def.node_def):
        return None
    call = calls[0]
    argument_index = {arg.name: i for i, arg in enumerate(function_def.signature.input_arg)}
    arguments = []
    for input_str in data_inputs(call):
        name, output = body_source(by_name, input_str)
        if output or name not in argument_index:
            return None  # a value the body computes, not an argument passed on
        arguments.append(argument_index[name])
    ports = []
    for output_arg in function_def.signature.output_arg:
        name, output = body_source(by_name, function_def.ret[output_arg.name])
        kind, _, port = output.partition(":")
        if name != call.name or kind != "output" or not port.isdigit():
            return None
        ports.append(int(port))
    return call.attr["f"].func.name, arguments, ports
