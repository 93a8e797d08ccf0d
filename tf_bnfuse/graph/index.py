"""GraphIndex: a read-only view of a GraphDef, with nodes by name and consumers by tensor.

Passes find patterns by following input edges through this index, never by a
node's position in graph_def.node.
"""

import collections

from tf_bnfuse.graph import walks
from tf_bnfuse.graph import weights as weights_lib
from tf_bnfuse.graph.names import canonical_tensor, parse_input

CONST_CACHE_MAX_BYTES = 1 << 16


class GraphIndex:
    """Read-only view of a GraphDef: nodes by name and consumers by tensor.

    outputs are tensor names that leave the graph (signature outputs). They
    count as consumers: a tensor that is also an output must not be rewritten.
    When outputs are given, only live consumers (nodes some output needs) are
    indexed: a node an earlier pass left dead cannot see a rewrite.
    weights: the WeightStore that holds the graph's stored Consts (a pass's context.weights).
    """

    def __init__(self, graph_def, outputs=(), weights=None):
        self.graph_def = graph_def
        self.weights = weights
        self.nodes = {}
        for node in graph_def.node:
            self.nodes[node.name] = node
        self.output_tensors = frozenset(canonical_tensor(t) for t in outputs)
        self.live = walks.live_nodes(graph_def, outputs) if outputs else frozenset(self.nodes)
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
        self._functions = None
        self.numpy_values = {}  # node name -> its value as const_eval computed it (None: not computable)

    def function(self, name):
        """The FunctionDef `name` of the graph's library, or None."""
        if self._functions is None:
            self._functions = {f.signature.name: f for f in self.graph_def.library.function}
        return self._functions.get(name)

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

    def only_reader(self, node_name, reader):
        """The control edges [(consumer, source)] from node_name and the Identities passing it on
        when node `reader` is all that reads its value (one output) through Identity chains, and
        no graph output is on the way; else None. (A control edge from a constant orders nothing
        that needs its value: a frozen variable read keeps those of the tf.function it was in.)"""
        names_read, control_edges = [node_name], []
        while names_read:
            name = names_read.pop()
            if self.ports_in_use(name) - {0} or self.is_output(name):
                return None
            control_edges += [(consumer, name) for consumer in self.control_consumers(name)]
            for consumer, _ in self.data_consumers(name):
                if consumer == reader:
                    continue
                if self.nodes[consumer].op != "Identity":
                    return None
                names_read.append(consumer)
        return control_edges

    def skip_identities(self, input_str):
        """Follows Identity-like nodes upward; returns (node, port) of the real producer."""
        return self.producer(walks.forwarded_input(input_str, self.nodes.get))

    def const_node(self, input_str):
        """The Const node an input reads, through Identity chains, or None."""
        node, _ = self.skip_identities(input_str)
        if node is not None and node.op == "Const":
            return node
        return None

    def const_shape(self, input_str):
        """The shape of the Const an input reads (through Identity), from its proto; None if not constant."""
        node = self.const_node(input_str)
        if node is None:
            return None
        return tuple(d.size for d in node.attr["value"].tensor.tensor_shape.dim)

    def const_array(self, node):
        """The value of a Const node of this graph (read-only), stored outside the proto or not."""
        return weights_lib.const_array(node, self.weights)

    def const_value(self, input_str):
        """The numpy value an input reads from a Const (through Identity), or None."""
        node = self.const_node(input_str)
        if node is None:
            return None
        cached = self._const_cache.get(node.name)
        if cached is not None:
            return cached
        value = self.const_array(node)
        # Small values (batch norm parameters, biases) are read many times;
        # a kernel is read once per fold and caching it would hold a second
        # copy of every weight until the pass ends.
        if value.nbytes <= CONST_CACHE_MAX_BYTES:
            self._const_cache[node.name] = value
        return value
