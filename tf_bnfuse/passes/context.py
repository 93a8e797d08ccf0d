"""PassContext: what every pass's run() is handed besides the graph (Grappler's RemapperContext).

It replaces module-level registries: the WeightStore that holds the pipeline's big
weights, and the GraphIndex of the graph the passes are reading, kept while passes leave
that graph as it is. A pipeline inside a function body (fold_in_functions) runs with a
context of its own (nested()).
"""

from tf_bnfuse import graph as graph_lib


class PassContext:

    def __init__(self, weights=None, left_out=()):
        self.weights = weights if weights is not None else graph_lib.WeightStore()
        self._indexed = None  # (graph_def, frozenset of outputs, GraphIndex)
        # Names of affine nodes whose folds the fold passes leave alone: a failed verification
        # is traced to its fold by running the pipeline again without some (verify/culprit).
        self.left_out = frozenset(left_out)

    def leaves_out(self, chain_nodes):
        """Whether a chain of these NodeDefs is left unfolded (one of them is named in left_out)."""
        return bool(self.left_out) and any(n.name in self.left_out for n in chain_nodes)

    def index(self, graph_def, outputs=()):
        """GraphIndex(graph_def, outputs), the one already built when the previous pass left the
        graph unchanged: building the same index again costs about 7 us per node. Only the
        latest index is kept, so no replaced graph stays alive."""
        key = frozenset(graph_lib.canonical_tensor(t) for t in outputs)
        if self._indexed is not None and self._indexed[0] is graph_def and self._indexed[1] == key:
            return self._indexed[2]
        self._indexed = None  # before building: the old graph is freed first
        index = graph_lib.GraphIndex(graph_def, outputs, self.weights)
        self._indexed = (graph_def, key, index)
        return index

    def editor(self, graph_def, outputs=None):
        """A GraphEditor whose new big Consts go into this context's WeightStore."""
        return graph_lib.GraphEditor(graph_def, outputs, self.weights)

    def graph_changed(self):
        """A pass returned a new graph: the kept index no longer describes what the next pass reads."""
        self._indexed = None

    def nested(self, function_name):
        """A context for a pipeline over a function body, with its own store; its folds are
        reported as "<function>/<node>", which is how left_out names them, the function by a
        name that survives freezing again (graph.stable_function_name)."""
        stable = graph_lib.stable_function_name(function_name)
        return PassContext(graph_lib.WeightStore(self.weights.min_bytes),
                           [node for function, _, node in (n.partition("/") for n in self.left_out)
                            if node and graph_lib.stable_function_name(function) == stable])
