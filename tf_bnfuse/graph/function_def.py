"""A GraphDef as a FunctionDef, made from the protos alone.

What a probe runs (savedmodel/probe.py): registered and called as it is, its graph is never
built op by op in Python, which cost import_graph_def about 60 us a node (a Python object for
each, its colocation looked up) before TensorFlow's own instantiation. The conversion is
TensorFlow's GraphToFunctionDef (function.cc): a node reads another's output by the name of its
OpDef's output argument and an index within it ("node:output:0"), an argument by its name.
"""

from tf_bnfuse.graph import tf_internal
from tf_bnfuse.graph.names import parse_input


def function_def(graph_def, name, arguments, outputs):
    """FunctionDef `name` of graph_def's nodes (not its library: the caller registers those),
    returning the tensors named in `outputs`.

    arguments: [(tensor name, DataType enum)]: every read of such a tensor reads that argument
    instead (its Placeholder or Const, and any control edge from it, is left out: a weight
    stored outside its Const is fed). The arguments are named arg_0.., the outputs output_0..;
    a node's device is kept.
    """
    result = tf_internal.FunctionDefProto()
    result.signature.name = name
    result.signature.is_stateful = True  # whatever it holds runs, as a wrapped function's nodes do
    argument_of = {}  # "node:port" -> (argument name, DataType)
    for i, (tensor, dtype) in enumerate(arguments):
        argument_of["%s:%d" % parse_input(tensor)[:2]] = ("arg_%d" % i, dtype)
        result.signature.input_arg.add(name="arg_%d" % i, type=dtype)
    left_out = {node.name for node in graph_def.node
                if node.op in ("Placeholder", "Const") and node.name + ":0" in argument_of}
    ports = _Ports(graph_def)

    def read(input_str):
        """input_str in FunctionDef's form; None for a control edge left out."""
        node, port, control = parse_input(input_str)
        if control:
            return None if node in left_out else input_str
        if "%s:%d" % (node, port) in argument_of:
            return argument_of["%s:%d" % (node, port)][0]
        argument, index = ports.argument(node, port)
        return "%s:%s:%d" % (node, argument, index)

    for node in graph_def.node:
        if node.name in left_out:
            continue
        copied = result.node_def.add()
        copied.CopyFrom(node)
        del copied.input[:]
        copied.input.extend(i for i in (read(i) for i in node.input) if i is not None)
    for i, tensor in enumerate(outputs):
        node, port, _ = parse_input(tensor)
        argument = argument_of.get("%s:%d" % (node, port))
        result.signature.output_arg.add(name="output_%d" % i,
                                        type=argument[1] if argument else ports.dtype(node, port))
        result.ret["output_%d" % i] = read(tensor)
    return result


def dtypes_of(graph_def, tensors):
    """{tensor name: DataType} of tensors of graph_def's nodes, from their ops' OpDefs."""
    return dtype_reader(graph_def)(tensors)


def dtype_reader(graph_def):
    """dtypes_of(graph_def, ·) for many calls on one graph: its nodes indexed once."""
    ports = _Ports(graph_def)
    return lambda tensors: {tensor: ports.dtype(*parse_input(tensor)[:2]) for tensor in tensors}


class _Ports:
    """The output ports of graph_def's nodes: (OpDef output argument, index within it) and dtype.
    An op whose output arguments are one tensor each has the same arguments on every node: its
    OpDef is read once (a probe converts ~1000 nodes of a few dozen ops)."""

    def __init__(self, graph_def):
        self._nodes = {node.name: node for node in graph_def.node}
        self._signatures = {f.signature.name: f.signature for f in graph_def.library.function}
        self._single = {}  # op -> [output argument name] where each is one tensor, else None

    def argument(self, node_name, port):
        node = self._nodes[node_name]
        if node.op not in self._single:
            op = None if node.op in self._signatures else tf_internal.op_def(node.op)
            self._single[node.op] = [arg.name for arg in op.output_arg] if op is not None and not any(
                arg.number_attr or arg.type_list_attr for arg in op.output_arg) else None
        single = self._single[node.op]
        if single is not None:
            return single[port], 0
        return _output_arguments(node, self._signatures)[port][:2]

    def dtype(self, node_name, port):
        return _output_arguments(self._nodes[node_name], self._signatures)[port][2]


def _output_arguments(node, signatures):
    """[(output argument name, index within it, DataType)] of each output port of a node: from
    its op's OpDef, a list argument's length and types from the node's attrs (or their
    defaults), or from the signature of the library function it calls by name."""
    if node.op in signatures:
        return [(arg.name, 0, arg.type) for arg in signatures[node.op].output_arg]
    op = tf_internal.op_def(node.op)
    if op is None:
        raise ValueError("node %s: no op %s is registered" % (node.name, node.op))
    defaults = {attr.name: attr.default_value for attr in op.attr if attr.HasField("default_value")}

    def attr(key):
        return node.attr[key] if key in node.attr else defaults[key]
    found = []
    for arg in op.output_arg:
        if arg.type_list_attr:
            types = list(attr(arg.type_list_attr).list.type)
        else:
            types = [arg.type or attr(arg.type_attr).type] * (attr(arg.number_attr).i if arg.number_attr else 1)
        found.extend((arg.name, index, dtype) for index, dtype in enumerate(types))
    return found
