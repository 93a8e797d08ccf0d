"""GraphEditor: collects a pass's edits to a GraphDef into a new one."""

import collections

import numpy as np
import tensorflow as tf

from tf_bnfuse.graph import names
from tf_bnfuse.graph.weights import WEIGHT_KEY_ATTR

# Consts of at least this many elements are written as raw tensor_content (small ones keep
# make_tensor_proto's form, which folds a splat into one value).
DIRECT_CONTENT_MIN_SIZE = 1024


class GraphEditor:
    """Collects edits to a GraphDef into a new one: new nodes with unique names.

    The GraphDef given is never modified. The result holds the new nodes, a copy of each
    node the pass edits, and, when it is asked for, a copy of every other node; a pass
    that changes nothing costs no copy at all. With `outputs` (the pass's graph outputs),
    the Consts and Identities that the pass's rewiring left without any reader (a folded
    kernel's old Const, and the Identity a frozen graph reads it through) are not copied:
    protobuf keeps every byte it has copied until the whole GraphDef goes, so a dead
    weight copied here would be held through every later pass. weights: the WeightStore
    new big Consts go into (None: into the proto).
    """

    def __init__(self, graph_def, outputs=None, weights=None):
        self._source = graph_def
        self._weights = weights
        self._result = None  # the new GraphDef: added nodes and copies of edited ones
        self._by_name = {}  # current name -> NodeDef in _result
        self._copied = set()  # names (in the source) of the source nodes copied for editing
        self._source_by_name = None
        self._finished = False
        self._outputs = None if outputs is None else {names.canonical_tensor(t)[0] for t in outputs}
        self._names = {node.name for node in graph_def.node}
        self._weight_names = None  # weight key -> how many source nodes name it (forget_read)

    @property
    def releases_weights(self):
        """Whether the store shrinks input variables a fold no longer reads (WeightStore.releases)."""
        return self._weights is not None and self._weights.releases

    def forget_read(self, node, last_reader=False):
        """WeightStore.forget_read for a stored Const of the source graph (none without a store).
        last_reader: the pass rewired the only reader of `node` (GraphIndex.only_reader); it is
        passed on when no other node of the source graph names the same weight."""
        if self._weights is None or node is None or WEIGHT_KEY_ATTR not in node.attr:
            return
        if last_reader and self.releases_weights:
            if self._weight_names is None:  # counted once a pass, not once a fold
                self._weight_names = collections.Counter(
                    other.attr[WEIGHT_KEY_ATTR].s for other in self._source.node if WEIGHT_KEY_ATTR in other.attr)
            last_reader = self._weight_names[node.attr[WEIGHT_KEY_ATTR].s] == 1
        self._weights.forget_read(node, last_reader)

    @property
    def graph_def(self):
        """The edited GraphDef, or the original itself when nothing was edited."""
        if self._result is None:
            return self._source
        if not self._finished:
            self._finish()
        return self._result

    def _edited(self):
        if self._finished:
            raise RuntimeError("GraphEditor: edit after graph_def was read")
        if self._result is None:
            self._result = names.new_graph_def(self._source)
            self._source_by_name = {node.name: node for node in self._source.node}
        return self._result

    def node(self, name):
        """The node `name` of the result, for editing."""
        self._edited()
        node = self._by_name.get(name)
        if node is None:
            if name in self._copied:  # renamed away
                raise KeyError(name)
            node = self._result.node.add()
            node.CopyFrom(self._source_by_name[name])
            self._by_name[name] = node
            self._copied.add(name)
        return node

    def _finish(self):
        """Copies the source nodes not edited into the result, but those the pass left unread."""
        rest = [n for n in self._source.node if n.name not in self._copied]
        dropped = self._unread(rest) if self._outputs is not None else set()
        for node in rest:
            if node.name not in dropped:
                self._result.node.add().CopyFrom(node)
        self._finished = True

    def _unread(self, rest):
        """Source Consts and Identities (not copied for editing) that nothing reads any more,
        though something read them before the pass."""
        def read_by(node):
            return [names.parse_input(i)[0] for i in node.input]
        read_before = {name for node in self._source.node for name in read_by(node)}
        readers = collections.Counter(name for node in list(self._result.node) + rest for name in read_by(node))
        candidates = {n.name: n for n in rest if n.op in ("Const", "Identity") and n.name not in self._outputs
                      and n.name in read_before}
        queue = [name for name in candidates if readers[name] == 0]
        dropped = set()
        while queue:
            name = queue.pop()
            dropped.add(name)
            for source in read_by(candidates[name]):
                readers[source] -= 1
                if readers[source] == 0 and source in candidates and source not in dropped:
                    queue.append(source)
        return dropped

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
        node = self._edited().node.add()
        node.name = self.unique_name(base_name)
        node.op = "Const"
        node.attr["dtype"].type = dtype.as_datatype_enum
        array = np.asarray(value).astype(dtype.as_numpy_dtype, copy=False)
        tensor = node.attr["value"].tensor
        stored = self._weights is not None and self._weights.holds(array, dtype)
        if not stored and array.size < DIRECT_CONTENT_MIN_SIZE:
            tensor.CopyFrom(tf.make_tensor_proto(array))
        else:  # a kernel: its bytes kept in the store, or written once (not into a proto then copied)
            tensor.dtype = dtype.as_datatype_enum
            tensor.tensor_shape.CopyFrom(tf.TensorShape(array.shape).as_proto())
            if stored:
                node.attr[WEIGHT_KEY_ATTR].s = self._weights.put(array).encode()
            else:
                tensor.tensor_content = np.ascontiguousarray(array).tobytes()
        self._by_name[node.name] = node
        return node.name

    def rename_node(self, name, new_name):
        """Gives node `name` the (unique, reserved) new_name; inputs naming `name` are not changed."""
        node = self.node(name)
        node.name = new_name
        del self._by_name[name]
        self._by_name[new_name] = node
        self._names.add(new_name)

    def add_node(self, name, op, inputs, attrs):
        """Adds a node under `name`, which must be free (e.g. just renamed away)."""
        node = self._edited().node.add(name=name, op=op)
        node.input.extend(inputs)
        for key, value in attrs.items():
            node.attr[key].CopyFrom(value)
        self._by_name[name] = node
        self._names.add(name)
        return node

    def replace_node(self, name, op, inputs, attrs):
        """Turns node `name` into a new op in place, keeping its name (and so its consumers)."""
        node = self.node(name)
        new = tf.compat.v1.NodeDef(name=name, op=op, device=node.device)
        new.input.extend(list(inputs) + names.control_inputs(node))
        for key, value in attrs.items():
            new.attr[key].CopyFrom(value)
        node.CopyFrom(new)
        return node

    def drop_control_input(self, name, source):
        """Removes node `name`'s control input from node `source`."""
        node = self.node(name)
        names.set_inputs(node, names.data_inputs(node) + [c for c in names.control_inputs(node) if c != "^" + source])

    def set_data_input(self, name, position, new_input):
        """Makes data input `position` of node `name` read new_input (control inputs keep their places)."""
        node = self.node(name)
        node.input[names.data_positions(node)[position]] = new_input
