"""The resources a signature captures besides read-only weights, and who owns them.

Freezing turns every captured variable into a constant. That is right for
weights and wrong for state: a variable a signature assigns (a counter, a
training-mode batch norm's moving averages) must stay a variable, and a
lookup table is a resource that has no constant form at all. Those captures
stay placeholders in the frozen graph; the written model feeds them the
original objects' handles, and saves those objects (with their assets and
initializers) beside the folded weights.
"""

import contextlib

from tf_bnfuse import graph as graph_lib

# Ops that change a resource variable in place; input 0 is the variable.
_WRITE_OP_PREFIXES = ("ResourceApply", "ResourceSparseApply", "ResourceScatter")
_WRITE_OPS = frozenset({"AssignVariableOp", "AssignAddVariableOp", "AssignSubVariableOp",
                        "ResourceStridedSliceAssign", "DestroyResourceOp"})


def is_write_op(op):
    return op in _WRITE_OPS or op.startswith(_WRITE_OP_PREFIXES)


class _WriteAnalysis:
    """Which placeholders (or function arguments) reach a write op's variable input."""

    def __init__(self, library):
        self.library = {f.signature.name: f for f in library.function}  # (a FunctionDefLibrary)
        self._written_args = {}  # function name -> set of written argument indices

    def written_sources(self, nodes, source_of):
        """Names of source nodes (placeholders, or function arguments) whose resource is written.

        nodes: node defs; source_of(input string): the source name behind it
        after Identities, or None.
        """
        written = set()
        for node in nodes:
            data_inputs = graph_lib.data_inputs(node)
            if is_write_op(node.op) and data_inputs:
                source = source_of(data_inputs[0])
                if source is not None:
                    written.add(source)
            functions, offset = graph_lib.called_functions(node, self.library)
            for function in functions:
                for arg in self.written_args(function):
                    if 0 <= arg + offset < len(data_inputs):
                        source = source_of(data_inputs[arg + offset])
                        if source is not None:
                            written.add(source)
        return written

    def written_args(self, name):
        if name in self._written_args:
            return self._written_args[name]
        self._written_args[name] = set()  # a recursive call writes nothing more than its first visit
        function = self.library.get(name)
        if function is None:
            return set()
        arg_index = {arg.name: i for i, arg in enumerate(function.signature.input_arg)}
        by_name = {node.name: node for node in function.node_def}

        def source_of(input_str):
            name, _ = graph_lib.body_source(by_name, input_str)
            return name if name in arg_index else None

        written = self.written_sources(function.node_def, source_of)
        self._written_args[name] = {arg_index[a] for a in written}
        return self._written_args[name]


def written_placeholders(graph_def):
    """Names of the placeholders of graph_def whose resource some op (in a called function too) writes."""
    index = graph_lib.GraphIndex(graph_def)

    def source_of(input_str):
        node, _ = index.skip_identities(input_str)
        return node.name if node is not None and node.op == "Placeholder" else None

    return _WriteAnalysis(graph_def.library).written_sources(graph_def.node, source_of)


def resource_owners(loaded):
    """{id(handle tensor): trackable} for every variable and resource under a loaded SavedModel (or
    a live object)."""
    import tensorflow as tf  # only the I/O layer needs TF objects here

    owners = {}
    # A live Keras 3 model lists variables its object graph does not reach (a Dropout's seed state)
    listed = getattr(loaded, "variables", None)
    listed = list(listed) if isinstance(listed, (list, tuple)) else []
    for obj in list(tf.train.TrackableView(loaded).descendants()) + listed:
        # A Keras 3 variable is a trackable wrapping the tf.Variable a function captures
        obj = obj.value if isinstance(getattr(obj, "value", None), tf.Variable) else obj
        if isinstance(obj, tf.Variable):
            handle = obj.handle
        elif hasattr(type(obj), "resource_handle"):
            try:
                handle = obj.resource_handle
            except Exception:  # a resource that cannot be created here: nothing can capture it either
                continue
        else:
            continue
        owners.setdefault(id(handle), obj)
    return owners


def variables_of(owners, handles):
    """The variables among the owners (resource_owners) of these handle ids."""
    import tensorflow as tf

    return [owners[h] for h in handles if isinstance(owners.get(h), tf.Variable)]


@contextlib.contextmanager
def values_restored(variables):
    """Gives the variables their values back on exit."""
    values = [v.read_value().numpy() for v in variables]
    try:
        yield
    finally:
        for variable, value in zip(variables, values):
            variable.assign(value)
