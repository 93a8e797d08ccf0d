"""Graph plumbing: an edge index over a GraphDef and small editing helpers.

Passes find patterns by following input edges through this index, never by a
node's position in graph_def.node.
"""

import collections

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import attr_value_pb2
from tensorflow.core.framework import graph_pb2
from tensorflow.core.framework import node_def_pb2

# Ops that forward their (port-matching) input unchanged.
IDENTITY_OPS = frozenset({"Identity", "IdentityN", "Snapshot", "StopGradient"})


def parse_input(input_str):
    """'name:port' -> (name, port, False); '^name' -> (name, -1, True)."""
    if input_str.startswith("^"):
        return input_str[1:], -1, True
    name, sep, port = input_str.rpartition(":")
    if sep and port.isdigit():
        return name, int(port), False
    return input_str, 0, False


def tensor_name(node_name, port=0):
    return node_name if port == 0 else "%s:%d" % (node_name, port)


def canonical_tensor(input_str):
    """'x' and 'x:0' name the same tensor; returns (name, port)."""
    name, port, _ = parse_input(input_str)
    return name, port


def copy_graph_def(graph_def):
    new = graph_pb2.GraphDef()
    new.CopyFrom(graph_def)
    return new


class GraphIndex:
    """Read-only view of a GraphDef: nodes by name and consumers by tensor.

    outputs are tensor names that leave the graph (signature outputs). They
    count as consumers: a tensor that is also an output must not be rewritten.
    When outputs are given, only live consumers (nodes some output needs) are
    indexed: a node an earlier pass left dead cannot see a rewrite.
    """

    def __init__(self, graph_def, outputs=()):
        self.graph_def = graph_def
        self.nodes = {}
        for node in graph_def.node:
            self.nodes[node.name] = node
        self.output_tensors = frozenset(canonical_tensor(t) for t in outputs)
        self.live = live_nodes(graph_def, outputs) if outputs else frozenset(self.nodes)
        # (node name, port) -> list of (consumer node name, input index)
        self._data_consumers = collections.defaultdict(list)
        self._control_consumers = collections.defaultdict(list)
        self._ports_in_use = collections.defaultdict(set)  # node name -> ports read
        for name, port in self.output_tensors:
            self._ports_in_use[name].add(port)
        for node in graph_def.node:
            if node.name not in self.live:
                continue
            for index, input_str in enumerate(node.input):
                name, port, is_control = parse_input(input_str)
                if is_control:
                    self._control_consumers[name].append(node.name)
                else:
                    self._data_consumers[(name, port)].append((node.name, index))
                    self._ports_in_use[name].add(port)
        self._const_cache = {}

    def node(self, name):
        return self.nodes.get(name)

    def producer(self, input_str):
        """The node and port behind an input string, or (None, port)."""
        name, port, _ = parse_input(input_str)
        return self.nodes.get(name), port

    def data_consumers(self, node_name, port=0):
        return self._data_consumers.get((node_name, port), [])

    def control_consumers(self, node_name):
        return self._control_consumers.get(node_name, [])

    def is_output(self, node_name, port=0):
        return (node_name, port) in self.output_tensors

    def use_count(self, node_name, port=0):
        """Data consumers of a tensor, counting a graph output as one."""
        return len(self.data_consumers(node_name, port)) + int(self.is_output(node_name, port))

    def ports_in_use(self, node_name):
        """Output ports of a node that something reads (a graph output included)."""
        return self._ports_in_use.get(node_name, set())

    def skip_identities(self, input_str):
        """Follows Identity-like nodes upward; returns (node, port) of the real producer."""
        node, port = self.producer(input_str)
        seen = set()
        while node is not None and node.op in IDENTITY_OPS and node.name not in seen:
            seen.add(node.name)
            data_inputs = [i for i in node.input if not i.startswith("^")]
            # IdentityN forwards input k to output k; the others have one input.
            index = port if node.op == "IdentityN" else 0
            if index >= len(data_inputs):
                return node, port
            node, port = self.producer(data_inputs[index])
        return node, port

    def const_node(self, input_str):
        """The Const node an input reads, through Identity chains, or None."""
        node, _ = self.skip_identities(input_str)
        if node is not None and node.op == "Const":
            return node
        return None

    def const_value(self, input_str):
        """The numpy value an input reads from a Const (through Identity), or None."""
        node = self.const_node(input_str)
        if node is None:
            return None
        if node.name not in self._const_cache:
            self._const_cache[node.name] = tf.make_ndarray(node.attr["value"].tensor)
        return self._const_cache[node.name]


class GraphEditor:
    """Collects edits to a copy of a GraphDef: new nodes with unique names."""

    def __init__(self, graph_def):
        self.graph_def = copy_graph_def(graph_def)
        self._names = {node.name for node in self.graph_def.node}
        self._by_name = {node.name: node for node in self.graph_def.node}

    def node(self, name):
        return self._by_name[name]

    def unique_name(self, base):
        name, suffix = base, 0
        while name in self._names:
            suffix += 1
            name = "%s_%d" % (base, suffix)
        self._names.add(name)
        return name

    def add_const(self, base_name, value, dtype):
        """Adds a Const of `value` cast to the TF dtype `dtype`; returns its name."""
        dtype = tf.as_dtype(dtype)
        node = self.graph_def.node.add()
        node.name = self.unique_name(base_name)
        node.op = "Const"
        node.attr["dtype"].type = dtype.as_datatype_enum
        node.attr["value"].tensor.CopyFrom(
            tf.make_tensor_proto(np.asarray(value).astype(dtype.as_numpy_dtype)))
        self._by_name[node.name] = node
        return node.name

    def replace_node(self, name, op, inputs, attrs):
        """Turns node `name` into a new op in place, keeping its name (and so its consumers)."""
        node = self._by_name[name]
        control_inputs = [i for i in node.input if i.startswith("^")]
        new = node_def_pb2.NodeDef(name=name, op=op, device=node.device)
        new.input.extend(list(inputs) + control_inputs)
        for key, value in attrs.items():
            new.attr[key].CopyFrom(value)
        node.CopyFrom(new)
        return node


def type_attr(dtype):
    return attr_value_pb2.AttrValue(type=tf.as_dtype(dtype).as_datatype_enum)


def string_attr(value):
    return attr_value_pb2.AttrValue(s=value.encode() if isinstance(value, str) else value)


def attr_string(node, key, default=""):
    if key in node.attr:
        return node.attr[key].s.decode()
    return default


def node_dtype(node, key="T"):
    """The TF dtype of a node's type attr, or None."""
    if key in node.attr and node.attr[key].type:
        return tf.as_dtype(node.attr[key].type)
    return None


def constant_only_nodes(graph_def):
    """Names of nodes that only yield constants and cannot fail or have effects:
    Const, Identity-like nodes of those, and NoOps that only wait for those."""
    nodes = {node.name: node for node in graph_def.node}
    result = {}

    def qualifies(name):
        # Iterative post-order walk: frozen graphs can hold long Identity chains.
        stack, on_stack = [name], {name}
        while stack:
            current = stack[-1]
            node = nodes.get(current)
            if node is None or not (node.op == "Const" or node.op in IDENTITY_OPS or node.op == "NoOp"):
                result[current] = False
            else:
                # A cycle back onto the stack counts as not constant-only.
                pending = {parse_input(i)[0] for i in node.input} - result.keys() - on_stack
                if pending:
                    stack.extend(pending)
                    on_stack |= pending
                    continue
                result[current] = all(result.get(parse_input(i)[0], False) for i in node.input)
            stack.pop()
            on_stack.discard(current)
        return result[name]

    return {node.name for node in graph_def.node if qualifies(node.name)}


def live_nodes(graph_def, outputs, keep_ops=("Placeholder",)):
    """Names of the nodes an output reads through data or control edges (and keep_ops nodes)."""
    nodes = {node.name: node for node in graph_def.node}
    stack = [canonical_tensor(t)[0] for t in outputs]
    stack += [node.name for node in graph_def.node if node.op in keep_ops]
    needed = set()
    while stack:
        name = stack.pop()
        if name in needed or name not in nodes:
            continue
        needed.add(name)
        stack.extend(parse_input(i)[0] for i in nodes[name].input)
    return needed


def cleanup(graph_def, outputs, keep_ops=("Placeholder",)):
    """Returns a copy of graph_def without the nodes that no output needs.

    First, control edges from constant-only nodes are dropped: they order
    nothing. (A frozen tf.function keeps its automatic control dependencies
    on variable reads, which are Identity-of-Const after freezing and would
    otherwise keep every replaced weight alive.) Then a node stays when an
    output reads it through data or control edges. Placeholders always stay:
    they are signature inputs even when folding leaves one unused.
    """
    constant_only = constant_only_nodes(graph_def)
    result = graph_pb2.GraphDef()
    result.versions.CopyFrom(graph_def.versions)
    result.library.CopyFrom(graph_def.library)
    result.node.extend(graph_def.node)
    for node in result.node:
        kept = [i for i in node.input if not (i.startswith("^") and i[1:] in constant_only)]
        if len(kept) != len(node.input):
            del node.input[:]
            node.input.extend(kept)

    needed = live_nodes(result, outputs, keep_ops)
    kept_nodes = [node for node in result.node if node.name in needed]
    del result.node[:]
    result.node.extend(kept_nodes)
    return result
