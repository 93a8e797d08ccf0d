"""The weight store: big Consts held outside the protobuf while the passes run.

Every pass that changes a graph writes a new GraphDef, and protobuf copies each node it
keeps, weights included (every weight, once per pass). While the passes run, each big
Const's bytes live instead in a WeightStore as a read-only numpy array, and the node
keeps its dtype and shape and names its array in WEIGHT_KEY_ATTR: copying the node copies a
key. Weights are read from the proto once, kernels scaled into new arrays, and written
back once at the end. The store is handed to passes in their PassContext; nothing here
is module state.

A stored weight may also be a variable of the loaded SavedModel, not yet read (freezing
puts the variables it can there, savedmodel/freeze.py): its value is read the first time
a pass asks for it, and one no pass asks for is never copied; the writer saves the
variable itself.

The fold checks read the original's weights after the passes (verify/fold_check.py). A
variable with a source in the input's checkpoint is released all the same once its fold is
emitted; the check's probe reads it back from the checkpoint itself, a group at a time
(released_source, verify/fold_plan.reading_originals_in_turn); so is a stored Const with a
source (a TF1 reference variable as TensorFlow's freezing makes it, strip(sources=...)). One
without a source is pinned until the checks ran.
The store counts the bytes it keeps alive (held_bytes, peak_bytes), so that a test can hold
it to one copy of each kernel and one in flight.
"""

import functools
import hashlib
import itertools
import weakref

import numpy as np
import tensorflow as tf

from tf_bnfuse.graph import names
from tf_bnfuse.graph import tf_internal

WEIGHT_KEY_ATTR = "_tf_bnfuse_weight"
STORED_MIN_BYTES = 1 << 14
# What a folded float array must weigh to go into a variable in a releasing store (a kernel; a
# bias or a batch norm's parameters stay numpy: reading a variable back costs a copy).
VARIABLE_MIN_BYTES = 1 << 20


class WeightStore:
    """{key: read-only numpy array} of the Consts a pipeline holds outside the proto.

    min_bytes: Consts this big or bigger are held here (None: STORED_MIN_BYTES as it is
    when the store is made; the graph-level tests lower it to hold every Const).
    """

    def __init__(self, min_bytes=None, key_prefix="w"):
        self.arrays = {}
        self.variables = {}  # key -> the tf.Variable whose value the key stands for (read lazily)
        self.releases = False  # see the module docstring
        self.releasable = set()  # keys of input variables nothing but this store's graph reads
        self.made = set()  # keys of the variables this store made (put), not the input's
        # Keys kept whatever the graph names (pin): the original graph's weights that cannot be
        # read again (no source), until the fold checks have read them (verify/fold_check.py).
        self.pinned = frozenset()
        self.sources = {}  # key -> (checkpoint prefix, checkpoint key) of an input variable
        self.peak_bytes = 0  # the most held_bytes was
        self._held = 0  # held_bytes, kept as entries come and go (a store holds hundreds)
        self.min_bytes = STORED_MIN_BYTES if min_bytes is None else min_bytes
        self._prefix = key_prefix
        self._keys = itertools.count(1)
        self._copies = itertools.count(1)
        self._writable = {}  # id of an array new_array made over a variable -> (weakref to it, the variable)

    def copy(self):
        """A store holding the same entries (not copies of them), with keys of its own to come:
        a pipeline run from the same graph again retains and adds in its own store."""
        other = WeightStore(self.min_bytes, "%s%d_" % (self._prefix, next(self._copies)))
        other.arrays.update(self.arrays)
        other.variables.update(self.variables)
        other.made |= self.made
        other.sources.update(self.sources)
        other.pinned = self.pinned  # what the fold checks will read stays, whichever store retains
        other.recount()
        return other

    def pin(self, graph_def):
        """Keeps every weight graph_def names that cannot be read again from its source, whatever
        later graphs name, until unpin."""
        self.pinned = frozenset(k for k in self.named_keys(graph_def) if k not in self.sources)

    def unpin(self, graph_def):
        """Lets go of the pinned weights graph_def (the folded graph) does not name, as retain."""
        self.pinned = frozenset()
        self.retain(graph_def)

    def put_variable(self, variable, releasable=False, source=None):
        """A key for a variable's value, read when a pass first asks for it. releasable: nothing
        else of the run reads the variable, so a releasing store may shrink it (forget_read).
        source: (checkpoint prefix, key) its value can be read again from once released."""
        key = "%sv%d" % (self._prefix, next(self._keys))
        self.variables[key] = variable
        if releasable:
            self.releasable.add(key)
            self._held += _variable_bytes(variable)
            self._note()
        if source is not None:
            self.sources[key] = source
        return key

    def released_source(self, node):
        """(checkpoint prefix, key) of a stored Const's input variable that this store no longer
        holds (released, or never read), None for one it holds or cannot read again."""
        key = node.attr[WEIGHT_KEY_ATTR].s.decode()
        if key in self.variables or key in self.arrays:
            return None
        return self.sources.get(key)

    def held_bytes(self):
        """Bytes of weight values alive because of this store: its arrays, the variables it made,
        and the input's releasable variables not released yet (the others live with the input
        whatever the store does)."""
        return self._held

    def recount(self):
        """held_bytes counted anew from the entries (a copy: its releasable keys are its own)."""
        self._held = sum(a.nbytes for a in self.arrays.values()) + sum(
            _variable_bytes(v) for k, v in self.variables.items() if k in self.made or k in self.releasable)
        self._note()

    def _note(self):
        self.peak_bytes = max(self.peak_bytes, self._held)

    def _hold_array(self, key, array):
        self.arrays[key] = array
        self._held += array.nbytes
        self._note()

    def _drop_array(self, key):
        array = self.arrays.pop(key, None)
        if array is not None:
            self._held -= array.nbytes

    def _drop_variable(self, key):
        """Takes a variable out of the store (None if it holds none), no longer counted."""
        variable = self.variables.pop(key, None)
        if variable is not None and (key in self.made or key in self.releasable):
            self._held -= _variable_bytes(variable)
        return variable

    def forget_read(self, node, last_reader=False):
        """Drops the copy read so far of the variable a stored Const stands for (a folded kernel's
        old value, once its fold is emitted): it is read again should another consumer need it.
        last_reader: the fold replaced the only reader of that Const, which is the only node naming
        the value; a releasing store then shrinks a releasable variable to nothing."""
        key = node.attr[WEIGHT_KEY_ATTR].s.decode()
        if key in self.variables:
            self._drop_array(key)
        if last_reader:
            self._release(key)
            if key in self.sources and key not in self.pinned:  # a Const of the input's checkpoint
                self._drop_array(key)

    def variable_digest(self, node):
        """(dtype, shape, sha256) of the value of a variable this store made for a stored Const (read
        in place, not copied), None for one of the input: equal folds of two signatures are
        written once."""
        key = node.attr[WEIGHT_KEY_ATTR].s.decode()
        if key not in self.made:
            return None
        value = np.asarray(self.variables[key].value())
        return value.dtype.str, value.shape, hashlib.sha256(value).digest()

    def release(self, node):
        """Drops the array a stored Const names (the writer, once a variable holds its value)."""
        key = node.attr[WEIGHT_KEY_ATTR].s.decode()
        if key not in self.pinned:
            self._drop_array(key)

    def forget_read_variables(self):
        """Drops the arrays read from variables: a variable no fold changed is written as the
        variable it is, and its copy would only hold memory."""
        for key in self.variables:
            self._drop_array(key)

    def variable_of(self, node):
        """The variable a stored Const stands for, or None (its value is an array of this store)."""
        return self.variables.get(node.attr[WEIGHT_KEY_ATTR].s.decode())

    def _in_variable(self, nbytes, dtype):
        """Whether a new weight of this size and numpy dtype goes into a variable (put)."""
        return self.releases and nbytes >= VARIABLE_MIN_BYTES and np.issubdtype(dtype, np.floating)

    def new_array(self, shape, dtype):
        """An array of uninitialized values for a new weight (a folded kernel) that put() then
        holds. One that goes into a variable is that variable's own buffer
        (tf_internal.writable_variable), which put() keeps as it is: no copy."""
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        made = tf_internal.writable_variable(shape, dtype) if self._in_variable(nbytes, dtype) else None
        if made is None:
            return np.empty(shape, dtype)
        variable, array = made
        self._writable[id(array)] = (weakref.ref(array), variable)
        weakref.finalize(array, self._writable.pop, id(array), None)  # a fold refused after all
        return array

    def put(self, array):
        key = "%s%d" % (self._prefix, next(self._keys))
        if self._in_variable(array.nbytes, array.dtype):
            self.made.add(key)
            reference, variable = self._writable.pop(id(array), (None, None))
            self.variables[key] = (variable if reference is not None and reference() is array else
                                   tf_internal.variable_holding(array))  # in TensorFlow's memory (docstring)
            self._held += array.nbytes
            self._note()
            return key
        array = array.view()
        array.setflags(write=False)
        self._hold_array(key, array)
        return key

    def holds(self, array, dtype):
        """Whether a new Const of this value and TF dtype goes into the store."""
        return dtype.is_numeric and array.nbytes >= self.min_bytes

    def array(self, node):
        """The array a stored Const names (a variable's is read here, once)."""
        key = node.attr[WEIGHT_KEY_ATTR].s.decode()
        if key not in self.arrays:
            if key not in self.variables:
                raise KeyError("Const %s names weight %s, which this store does not hold" % (node.name, key))
            # A read-only view of the variable's own buffer, not a copy: a folded kernel's original is
            # then held once while its fold is computed (TensorFlow copies a variable on write while
            # another tensor shares its buffer).
            array = np.asarray(self.variables[key].read_value())
            array.setflags(write=False)
            self._hold_array(key, array)
        return self.arrays[key]

    def strip(self, graph_def, sources=None):
        """A copy of graph_def whose big Consts name arrays in this store; graph_def itself when
        it has none (it is not modified either way). sources: {Const name: (checkpoint prefix,
        key)}: only those are stored, each with where its value can be read again."""
        def storable(node):
            return self._storable(node) and (sources is None or node.name in sources)
        if not any(storable(node) for node in graph_def.node):
            return graph_def
        stripped = names.new_graph_def(graph_def)
        for node in graph_def.node:
            tensor = node.attr["value"].tensor if storable(node) else None
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
            key = self.put(content_view(tensor, content))
            new.attr[WEIGHT_KEY_ATTR].s = key.encode()
            if sources is not None:
                self.sources[key] = sources[node.name]
        return stripped

    def retain(self, graph_def):
        """Forgets the arrays no node of graph_def names (a folded kernel's old weights); a releasing
        store shrinks the releasable variables among them."""
        named = self.named_keys(graph_def) | self.pinned
        for key in [k for k in self.arrays if k not in named]:
            self._drop_array(key)
        for key in [k for k in self.variables if k not in named]:
            self._release(key)
            self._drop_variable(key)
            self.made.discard(key)

    def _release(self, key):
        """Shrinks the input variable of a releasable key, which nothing reads now, in a releasing
        store; it leaves the store (a read would fail, not return nothing)."""
        if self.releases and key in self.releasable and key not in self.pinned:
            variable = self._drop_variable(key)
            self.releasable.discard(key)
            shrink(variable)

    @staticmethod
    def named_keys(graph_def):
        """The keys graph_def's stored Consts name."""
        return {node.attr[WEIGHT_KEY_ATTR].s.decode() for node in graph_def.node
                if node.op == "Const" and WEIGHT_KEY_ATTR in node.attr}

    def restore(self, graph_def):
        """Writes the stored arrays back into graph_def's Consts, in place; returns graph_def."""
        for node in graph_def.node:
            if node.op == "Const" and WEIGHT_KEY_ATTR in node.attr:
                self.restore_node(node)
        return graph_def

    def restore_node(self, node):
        """Puts a stored Const's bytes back into its proto (in place)."""
        array = self.array(node)
        # A weight no pass changed is a view of the bytes it was read from: those go back as they are.
        unchanged = isinstance(array.base, bytes) and len(array.base) == array.nbytes
        node.attr["value"].tensor.tensor_content = array.base if unchanged else np.ascontiguousarray(array).tobytes()
        del node.attr[WEIGHT_KEY_ATTR]

    def _storable(self, node):
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
        return elements * dtype.size >= self.min_bytes


def _variable_bytes(variable):
    return variable.shape.num_elements() * variable.dtype.size


def shrink(variable):
    """Frees a variable's value: it now holds an empty tensor (AssignVariableOp without shape
    validation). Its users must not run again; TensorFlow reuses the memory for later tensors."""
    tf.raw_ops.AssignVariableOp(resource=variable.handle, value=_empty(variable.dtype), validate_shape=False)


@functools.lru_cache(maxsize=None)
def _empty(dtype):
    """An empty tensor of dtype, made once (tf.zeros costs half a millisecond a call, and a run
    shrinks a variable per folded kernel)."""
    return tf.constant(np.zeros([0], tf.as_dtype(dtype).as_numpy_dtype))


def const_array(node, weights=None):
    """The numpy value of a Const node, held in `weights` (a WeightStore) or not (read-only)."""
    if WEIGHT_KEY_ATTR in node.attr:
        return _store_of(node, weights).array(node)
    return ndarray(node.attr["value"].tensor)


def const_nbytes(node, weights=None):
    """Bytes of a Const's value, without reading it."""
    tensor = node.attr["value"].tensor
    if WEIGHT_KEY_ATTR in node.attr:  # a stored Const keeps its dtype and shape
        elements = 1
        for dim in tensor.tensor_shape.dim:
            elements *= max(dim.size, 0)
        return elements * tf.as_dtype(tensor.dtype).size
    return len(tensor.tensor_content) or tensor.ByteSize()


def _store_of(node, weights):
    if weights is None:
        raise KeyError("Const %s names a stored weight, and no WeightStore was given" % node.name)
    return weights


def ndarray(tensor_proto):
    """tf.make_ndarray, but a tensor_content is read as a read-only view of the one bytes
    copy protobuf hands out, instead of copied once more (a kernel is megabytes)."""
    if tf.as_dtype(tensor_proto.dtype).is_numeric:
        content = tensor_proto.tensor_content
        value = content_view(tensor_proto, content) if content else None
        if value is not None:
            return value
    return tf.make_ndarray(tensor_proto)


def content_view(tensor_proto, content):
    """A read-only array over `content`, the tensor_content bytes of a numeric tensor_proto;
    None when their size does not match its shape."""
    shape = [d.size for d in tensor_proto.tensor_shape.dim]
    value = np.frombuffer(content, dtype=tf.as_dtype(tensor_proto.dtype).as_numpy_dtype)
    return value.reshape(shape) if value.size == int(np.prod(shape)) else None
