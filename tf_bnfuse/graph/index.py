"""Graph plumbing: an edge index over a GraphDef and small editing helpers.

Passes find patterns by following input edges through this index, never by a
node's position in graph_def.node.
"""

import collections
import itertools

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


# The ops that call one function by their `f` attr, with the node's inputs as its arguments.
CALL_OPS = frozenset({"PartitionedCall", "StatefulPartitionedCall"})


def called_function_names(node):
    """The names of the library functions a node's attributes name (a call's `f`, a While's
    `body` and `cond`, an If's branches, a Case's `branches`)."""
    names = [value.func.name for value in node.attr.values() if value.HasField("func")]
    return names + [f.name for value in node.attr.values() for f in value.list.func]


def copy_graph_def(graph_def):
    new = graph_pb2.GraphDef()
    new.CopyFrom(graph_def)
    return new


CONST_CACHE_MAX_BYTES = 1 << 16
# Consts of at least this many elements are written as raw tensor_content (small ones keep
# make_tensor_proto's form, which folds a splat into one value).
DIRECT_CONTENT_MIN_SIZE = 1024


# --- Weights held outside the protobuf while the passes run --------------------------------
#
# Every pass that changes a graph writes a new GraphDef, and protobuf copies each node it
# keeps, weights included (100 MB per pass on ResNet50). While run_pipeline runs, each big
# Const's bytes live instead in a WeightStore as a read-only numpy array, and the node
# keeps its dtype and shape and names its array in this attr: copying the node copies a
# key. Weights are read from the proto once, kernels scaled into new arrays, and written
# back once at the end.
WEIGHT_KEY_ATTR = "_tf_bnfuse_weight"
STORED_MIN_BYTES = 1 << 14


class WeightStore:
    """{key: read-only numpy array} of the Consts run_pipeline holds outside the proto."""

    _keys = itertools.count(1)  # unique across nested stores (fold_in_functions' inner pipelines)

    def __init__(self):
        self.arrays = {}

    def put(self, array):
        key = "w%d" % next(WeightStore._keys)
        array = array.view()
        array.setflags(write=False)
        self.arrays[key] = array
        return key

    def strip(self, graph_def):
        """A copy of graph_def whose big Consts name arrays in this store; graph_def itself when
        it has none (it is not modified either way)."""
        if not any(_storable(node) for node in graph_def.node):
            return graph_def
        stripped = graph_pb2.GraphDef()
        stripped.versions.CopyFrom(graph_def.versions)
        stripped.library.CopyFrom(graph_def.library)
        for node in graph_def.node:
            tensor = node.attr["value"].tensor if _storable(node) else None
            content = tensor.tensor_content if tensor is not None else b""  # protobuf's one copy
            if not content:  # small, or a splat held as one value
                stripped.node.add().CopyFrom(node)
                continue
            new = stripped.node.add(name=node.name, op=node.op, device=node.device)
            new.input.extend(node.input)
            for key, value in node.attr.items():
                if key != "value":
                    new.attr[key].CopyFrom(value)
            new_tensor = new.attr["value"].tensor
            new_tensor.dtype = tensor.dtype
            new_tensor.tensor_shape.CopyFrom(tensor.tensor_shape)
            new.attr[WEIGHT_KEY_ATTR].s = self.put(_content_view(tensor, content)).encode()
        return stripped

    def retain(self, graph_def):
        """Forgets the arrays no node of graph_def names (a folded kernel's old weights)."""
        named = {node.attr[WEIGHT_KEY_ATTR].s.decode() for node in graph_def.node
                 if node.op == "Const" and WEIGHT_KEY_ATTR in node.attr}
        for key in [k for k in self.arrays if k not in named]:
            del self.arrays[key]

    def restore(self, graph_def):
        """Writes the stored arrays back into graph_def's Consts, in place; returns graph_def."""
        for node in graph_def.node:
            if node.op == "Const" and WEIGHT_KEY_ATTR in node.attr:
                restore_node(node)
        return graph_def


def _storable(node):
    """A Const big enough to hold outside the proto, judged by its shape (reading its
    tensor_content would copy it)."""
    if node.op != "Const" or WEIGHT_KEY_ATTR in node.attr:
        return False
    tensor = node.attr["value"].tensor
    dtype = tf.as_dtype(tensor.dtype)
    if not dtype.is_numeric:
        return False
    elements = 1
    for dim in tensor.tensor_shape.dim:
        elements *= max(dim.size, 0)
    return elements * dtype.size >= STORED_MIN_BYTES


_STORES = []  # the WeightStores of the run_pipeline calls under way, innermost last


def _stored(node):
    key = node.attr[WEIGHT_KEY_ATTR].s.decode()
    for store in reversed(_STORES):
        if key in store.arrays:
            return store.arrays[key]
    raise KeyError("Const %s names weight %s, which no running pipeline holds" % (node.name, key))


def restore_node(node):
    """Puts a stored Const's bytes back into its proto (in place)."""
    array = _stored(node)
    # A weight no pass changed is a view of the bytes it was read from: those go back as they are.
    unchanged = isinstance(array.base, bytes) and len(array.base) == array.nbytes
    node.attr["value"].tensor.tensor_content = array.base if unchanged else np.ascontiguousarray(array).tobytes()
    del node.attr[WEIGHT_KEY_ATTR]


class weights_outside_proto:  # pylint: disable=invalid-name
    """Context: big Consts added with GraphEditor.add_const go to its WeightStore."""

    def __init__(self):
        self.store = WeightStore()

    def __enter__(self):
        _STORES.append(self.store)
        return self.store

    def __exit__(self, *exc):
        _STORES.remove(self.store)


def const_array(node):
    """The numpy value of a Const node, stored outside its proto or not (read-only)."""
    if WEIGHT_KEY_ATTR in node.attr:
        return _stored(node)
    return _ndarray(node.attr["value"].tensor)


def const_nbytes(node):
    """Bytes of a Const's value, without reading it."""
    if WEIGHT_KEY_ATTR in node.attr:
        return _stored(node).nbytes
    tensor = node.attr["value"].tensor
    return len(tensor.tensor_content) or tensor.ByteSize()


def _ndarray(tensor_proto):
    """tf.make_ndarray, but a tensor_content is read as a read-only view of the one bytes
    copy protobuf hands out, instead of copied once more (a kernel is megabytes)."""
    if tf.as_dtype(tensor_proto.dtype).is_numeric:
        content = tensor_proto.tensor_content
        value = _content_view(tensor_proto, content) if content else None
        if value is not None:
            return value
    return tf.make_ndarray(tensor_proto)


def _content_view(tensor_proto, content):
    """A read-only array over `content`, the tensor_content bytes of a numeric tensor_proto;
    None when their size does not match its shape."""
    shape = [d.size for d in tensor_proto.tensor_shape.dim]
    value = np.frombuffer(content, dtype=tf.as_dtype(tensor_proto.dtype).as_numpy_dtype)
    return value.reshape(shape) if value.size == int(np.prod(shape)) else None


class _SharedIndex:
    """The GraphIndex of the graph the pipeline's passes are reading, while it stays the same.

    A pass that changes nothing hands the next pass the very GraphDef it got;
    building the same index again costs about 7 us per node. Only the latest
    index is kept, so no replaced graph stays alive; run_pipeline turns this on
    and forgets the index as soon as a pass returns a new graph.
    """

    def __init__(self):
        self.active = 0
        self.entry = None  # (graph_def, frozenset of outputs, GraphIndex)

    def get(self, graph_def, outputs):
        key = frozenset(canonical_tensor(t) for t in outputs)
        if self.entry is not None and self.entry[0] is graph_def and self.entry[1] == key:
            return self.entry[2]
        self.entry = None  # before building: the old graph is freed first
        index = GraphIndex(graph_def, outputs)
        if self.active:
            self.entry = (graph_def, key, index)
        return index


_SHARED = _SharedIndex()


def index_of(graph_def, outputs=()):
    """GraphIndex(graph_def, outputs), the one already built when a pipeline shares it."""
    return _SHARED.get(graph_def, outputs)


class sharing_indexes:  # pylint: disable=invalid-name
    """Context: index_of keeps the latest index between passes (run_pipeline)."""

    def __enter__(self):
        _SHARED.active += 1
        return self

    def __exit__(self, *exc):
        _SHARED.active -= 1
        if not _SHARED.active:
            _SHARED.entry = None

    @staticmethod
    def forget():
        """The graph changed: the kept index no longer describes what the next pass reads."""
        _SHARED.entry = None


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
        self._functions = None

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

    def const_shape(self, input_str):
        """The shape of the Const an input reads (through Identity), from its proto; None if not constant."""
        node = self.const_node(input_str)
        if node is None:
            return None
        return tuple(d.size for d in node.attr["value"].tensor.tensor_shape.dim)

    def const_value(self, input_str):
        """The numpy value an input reads from a Const (through Identity), or None."""
        node = self.const_node(input_str)
        if node is None:
            return None
        cached = self._const_cache.get(node.name)
        if cached is not None:
            return cached
        value = const_array(node)
        # Small values (batch norm parameters, biases) are read many times;
        # a kernel is read once per fold and caching it would hold a second
        # copy of every weight until the pass ends.
        if value.nbytes <= CONST_CACHE_MAX_BYTES:
            self._const_cache[node.name] = value
        return value


class GraphEditor:
    """Collects edits to a GraphDef into a new one: new nodes with unique names.

    The GraphDef given is never modified. The result holds the new nodes, a copy of each
    node the pass edits, and, when it is asked for, a copy of every other node; a pass
    that changes nothing costs no copy at all. With `outputs` (the pass's graph outputs),
    the Consts and Identities that the pass's rewiring left without any reader (a folded
    kernel's old Const, and the Identity a frozen graph reads it through) are not copied:
    protobuf keeps every byte it has copied until the whole GraphDef goes, so a dead
    weight copied here would be held through every later pass.
    """

    def __init__(self, graph_def, outputs=None):
        self._source = graph_def
        self._result = None  # the new GraphDef: added nodes and copies of edited ones
        self._by_name = {}  # current name -> NodeDef in _result
        self._copied = set()  # names (in the source) of the source nodes copied for editing
        self._source_by_name = None
        self._finished = False
        self._outputs = None if outputs is None else {canonical_tensor(t)[0] for t in outputs}
        self._names = {node.name for node in graph_def.node}

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
            self._result = graph_pb2.GraphDef()
            self._result.versions.CopyFrom(self._source.versions)
            self._result.library.CopyFrom(self._source.library)
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
            return [parse_input(i)[0] for i in node.input]
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
        stored = _STORES and array.nbytes >= STORED_MIN_BYTES and dtype.is_numeric
        if not stored and array.size < DIRECT_CONTENT_MIN_SIZE:
            tensor.CopyFrom(tf.make_tensor_proto(array))
        else:  # a kernel: its bytes kept in the store, or written once (not into a proto then copied)
            tensor.dtype = dtype.as_datatype_enum
            tensor.tensor_shape.CopyFrom(tf.TensorShape(array.shape).as_proto())
            if stored:
                node.attr[WEIGHT_KEY_ATTR].s = _STORES[-1].put(array).encode()
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
            if current in result:  # reached twice before its first visit finished
                stack.pop()
                on_stack.discard(current)
                continue
            node = nodes.get(current)
            if node is None or not (node.op == "Const" or node.op in IDENTITY_OPS or node.op == "NoOp"):
                result[current] = False
            else:
                # A cycle back onto the stack counts as not constant-only.
                # (Not `set - result.keys()`: that walks all of result each time.)
                pending = {s for s in (parse_input(i)[0] for i in node.input)
                           if s not in result and s not in on_stack}
                if pending:
                    stack.extend(pending)
                    on_stack |= pending
                    continue
                result[current] = all(result.get(parse_input(i)[0], False) for i in node.input)
            stack.pop()
            on_stack.discard(current)
        return result[name]

    return {node.name for node in graph_def.node if qualifies(node.name)}


def live_nodes(graph_def, outputs, keep_ops=("Placeholder",), ignored_control_inputs=frozenset()):
    """Names of the nodes an output reads through data or control edges (and keep_ops nodes).

    Control edges from nodes in ignored_control_inputs are not followed.
    """
    nodes = {node.name: node for node in graph_def.node}
    stack = [canonical_tensor(t)[0] for t in outputs]
    stack += [node.name for node in graph_def.node if node.op in keep_ops]
    needed = set()
    while stack:
        name = stack.pop()
        if name in needed or name not in nodes:
            continue
        needed.add(name)
        for input_str in nodes[name].input:
            source, _, is_control = parse_input(input_str)
            if not (is_control and source in ignored_control_inputs):
                stack.append(source)
    return needed


def cleanup(graph_def, outputs, keep_ops=("Placeholder",)):
    """Returns a copy of graph_def without the nodes that no output needs.

    First, control edges from constant-only nodes are dropped: they order
    nothing. (A frozen tf.function keeps its automatic control dependencies
    on variable reads, which are Identity-of-Const after freezing and would
    otherwise keep every replaced weight alive.) Then a node stays when an
    output reads it through data or control edges. Placeholders always stay:
    they are signature inputs even when folding leaves one unused. Only the
    nodes that stay are copied, so the dead weights are never copied.
    """
    constant_only = constant_only_nodes(graph_def)
    needed = live_nodes(graph_def, outputs, keep_ops, ignored_control_inputs=constant_only)
    result = graph_pb2.GraphDef()
    result.versions.CopyFrom(graph_def.versions)
    result.library.CopyFrom(graph_def.library)
    result.node.extend(node for node in graph_def.node if node.name in needed)
    for node in result.node:
        kept = [i for i in node.input if not (i.startswith("^") and i[1:] in constant_only)]
        if len(kept) != len(node.input):
            del node.input[:]
            node.input.extend(kept)
        drop_dangling_colocation(node, needed)
    return result


def drop_dangling_colocation(node, names):
    """Removes `_class: loc:@X` entries of a node whose X is not in `names`.

    Import refuses a node colocated with a node the graph no longer has, and
    a removed node constrains nothing.
    """
    if "_class" not in node.attr:
        return
    entries = list(node.attr["_class"].list.s)
    kept = [e for e in entries if not e.startswith(b"loc:@") or e[len(b"loc:@"):].decode() in names]
    if len(kept) == len(entries):
        return
    if kept:
        del node.attr["_class"].list.s[:]
        node.attr["_class"].list.s.extend(kept)
    else:
        del node.attr["_class"]
