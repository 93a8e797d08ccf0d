"""Every TensorFlow internal tf_bnfuse uses: `tensorflow.python` modules and private attributes.

Nothing else in the package imports `tensorflow.python` or touches a private attribute of a
TensorFlow object (tests/test_architecture.py checks the imports), so a TensorFlow upgrade
breaks here or nowhere. Each entry says why it is needed and what public API would replace
it, where one exists. It sits in the graph layer, the lowest that imports TensorFlow, so
that every layer above may use it.
"""

import ctypes
import os

import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2 as _saved_model_pb2
from tensorflow.core.framework.graph_debug_info_pb2 import GraphDebugInfo as _GraphDebugInfo
from tensorflow.core.framework import function_pb2 as _function_pb2
from tensorflow.core.protobuf import trackable_object_graph_pb2 as _trackable_object_graph_pb2
from tensorflow.python.eager import context as _context
from tensorflow.python.eager import wrap_function as _wrap_function
from tensorflow.python.framework import convert_to_constants as _convert_to_constants
from tensorflow.python.framework import function_def_to_graph as _function_def_to_graph
from tensorflow.python.framework import op_def_registry as _op_def_registry
from tensorflow.python.ops import resource_variable_ops as _resource_variable_ops
from tensorflow.python.saved_model import load as _tf_load

# The SavedModel proto has no public class (tf.compat.v1 has MetaGraphDef, not SavedModel).
SavedModelProto = _saved_model_pb2.SavedModel
# The FunctionDef proto has no public class either (graph/function_def.py makes them).
FunctionDefProto = _function_pb2.FunctionDef


def op_def(op_type):
    """The registered OpDef of an op type, or None. Why: whether an op is stateful, and how many
    outputs it has, by name; no public API looks an OpDef up."""
    return _op_def_registry.get(op_type)


def register_functions(function_defs):
    """Adds FunctionDefs to the eager context, where an op names them (StatefulPartitionedCall's
    f). Why: a probe's FunctionDef is made from protos (graph/function_def.py), not traced; the
    public way in, tf.function or wrap_function, builds its graph op by op in Python first."""
    for function in function_defs:
        _context.context().add_function_def(function)


def call_function(name, inputs, num_outputs):
    """The outputs of a function register_functions added, called eagerly as a ConcreteFunction
    calls its own: with the process's function options (tf.config.optimizer's, which
    verify/execution.as_written sets). Why: as register_functions; the public raw op,
    StatefulPartitionedCall, instantiates with its own config_proto attr instead."""
    return _context.context().call_function(name.encode(), list(inputs), num_outputs)


def remove_functions(names):
    """Removes functions register_functions added (what a WrappedFunction does when it goes).
    Why: as register_functions."""
    for name in names:
        if _context.context().has_function(name):
            _context.context().remove_function(name)


def function_def_to_graph_def(function_def):
    """(GraphDef of a FunctionDef's body, {nested tensor name: flat name}). Why: fold_in_functions
    runs the passes on a body; no public API converts a FunctionDef with its name map."""
    return _function_def_to_graph.function_def_to_graph_def(function_def)


def frozen_graph_def(function, keep):
    """(GraphDef with read-only variables as constants, output tensors) of a ConcreteFunction.

    Why: there is no public TF2 freezing API. convert_variables_to_constants_v2 spends most
    of its time (and a second copy of every weight) wrapping the frozen GraphDef into a new
    ConcreteFunction that we would only turn back into a GraphDef; its two private steps
    before that are called directly (TensorFlow 2.21, the one the package supports). keep:
    names of capture placeholders to leave as placeholders (variables the function writes).
    Control flow stays functional (While/If with body functions).
    """
    data = _convert_to_constants._FunctionConverterDataInEager(  # pylint: disable=protected-access
        func=function, lower_control_flow=False, aggressive_inlining=False, variable_names_denylist=set(keep) or None)
    graph_def, _ = _convert_to_constants._replace_variables_by_constants(  # pylint: disable=protected-access
        converter_data=data)
    return graph_def, list(function.outputs)


def read_debug_info(path):
    """The GraphDebugInfo TF's Loader takes, read as loader_impl reads it (empty where the folder has
    none). Why: the proto class is not public."""
    debug_info = _GraphDebugInfo()
    debug_path = os.path.join(path, "debug", "saved_model_debug_info.pb")
    if os.path.isfile(debug_path):
        with open(debug_path, "rb") as f:
            debug_info.ParseFromString(f.read())
    return debug_info


def load_object_graph(proto, meta_graph, path, debug_info):
    """(root object, {id(tf.Variable): its key in the SavedModel's checkpoint}) TF's Loader restores
    from a (pruned) SavedModel proto. Why: this is what tf.saved_model.load does after parsing,
    and load_partial uses the same Loader; no public API loads from a proto in memory. The
    checkpoint's object graph numbers its objects as the SavedModel's does, which the Loader
    restores by number: the keys let a variable the passes released be read again from the
    input's own files (graph/weights.py); no public API names a loaded variable's key."""
    with tf.init_scope():
        loader = _tf_load.Loader(meta_graph.object_graph_def, proto, path, tf.train.CheckpointOptions(),
                                 tf.saved_model.LoadOptions(), None)
        root = loader.get(0)
        root.graph_debug_info = loader.adjust_debug_info_func_names(debug_info)
    keys = {}
    prefix = checkpoint_prefix(path)
    if tf.io.gfile.exists(prefix + ".index"):
        object_graph = _trackable_object_graph_pb2.TrackableObjectGraph()
        object_graph.ParseFromString(tf.train.load_checkpoint(prefix).get_tensor("_CHECKPOINTABLE_OBJECT_GRAPH"))
        for node_id, node in enumerate(object_graph.nodes):
            for attribute in node.attributes:
                if attribute.name == "VARIABLE_VALUE" and node_id < len(meta_graph.object_graph_def.nodes):
                    obj = loader.get(node_id)
                    if isinstance(obj, tf.Variable):
                        keys[id(obj)] = attribute.checkpoint_key
    return root, keys


def variable_holding(array):
    """A tf.Variable (not trainable) holding a copy of a numpy array, made with one copy of it.
    Why: tf.Variable(array) converts the array to a tensor and then copies that into the
    variable (measured: a 200 MB array took 400 MB more on the way; a folded kernel is that
    big); a variable made uninitialized and then assigned takes the converted tensor itself.
    Public alternative: none that keeps the variable's static shape."""
    variable = _resource_variable_ops.UninitializedVariable(shape=array.shape, dtype=tf.as_dtype(array.dtype),
                                                             trainable=False)
    tf.raw_ops.AssignVariableOp(resource=variable.handle, value=array)
    return variable


def writable_variable(shape, dtype):
    """(a tf.Variable, not trainable, of uninitialized values, and a writable numpy array over its
    own buffer), or None where TensorFlow reads the variable into a copy. Why: a folded kernel
    written into TensorFlow's memory, not numpy's then copied, costs no copy, and takes the
    memory TensorFlow's allocator keeps from the original kernels the passes released (it
    keeps what it frees; numpy's is given back and comes back cold), which the fold checks'
    read of an original kernel then finds there too. Public alternative: none; a tensor's numpy
    view is read-only. The array keeps the variable alive; nothing else reads the buffer until
    the array is written (a new variable's), and TensorFlow's copy-on-write does not see numpy's
    writes: the caller fills it before anything reads the variable."""
    dtype = tf.as_dtype(dtype)
    variable = _resource_variable_ops.UninitializedVariable(shape=shape, dtype=dtype, trainable=False)
    tf.raw_ops.AssignVariableOp(resource=variable.handle, value=tf.raw_ops.Empty(shape=list(shape), dtype=dtype))
    first, second = (np.asarray(variable.read_value()) for _ in range(2))
    if first.ctypes.data != second.ctypes.data or not first.flags.c_contiguous:  # reads copy: not its buffer
        return None
    buffer = (ctypes.c_byte * first.nbytes).from_address(first.ctypes.data)
    buffer.variable = variable  # the buffer lives as long as the array does
    return variable, np.ctypeslib.as_array(buffer).view(dtype.as_numpy_dtype).reshape(shape)


def library_function_def(graph, name):
    """The FunctionDef of library function `name` that a FuncGraph calls (directly or through
    other calls), None where it has none by that name, or this TensorFlow names it otherwise
    (its callers then do without: a root function is called instead of shown by its graph).
    Why: graph.as_graph_def() serializes the whole library, a model's body with it, to show
    one small function; no public API names one."""
    lookup = getattr(graph, "_get_function", None)
    function = lookup(name) if lookup is not None else None
    return getattr(function, "cached_definition", None)


def checkpoint_prefix(path):
    """The prefix of a SavedModel folder's checkpoint files. Why: tf.saved_model names no API for
    it (saved_model/path_helpers.py: variables/variables)."""
    return os.path.join(path, "variables", "variables")


def function_from_graph_def(graph_def, inputs, outputs, captures):
    """A WrappedFunction of a GraphDef that captures the given tensors. Why: rebuilding a TF1
    init function without the captures it does not read; tf.compat.v1.wrap_function cannot
    take captures."""
    return _wrap_function.function_from_graph_def(graph_def, inputs, outputs, captures)


def set_call_signature(function, keywords):
    """Records the argument names a wrapped function is called with, as TF-TRT does. Why: a
    WrappedFunction does not record them, and a signature is called by keyword."""
    function._arg_keywords = list(keywords)  # pylint: disable=protected-access
    function._num_positional_args = len(keywords)  # pylint: disable=protected-access


def tf1_initializer_parts(initializer):
    """(init function, asset paths) of the initializer tf.saved_model.load gives a TF1 model
    (load_v1_in_v2._Initializer), or (None, None) where this TensorFlow's has other fields.
    Why: the init function is rebuilt without the unfolded weights it captures; no public API."""
    return getattr(initializer, "_init_fn", None), getattr(initializer, "_asset_paths", None)


def is_trackable(obj):
    """Whether obj is a Trackable (a tf.Module, a Keras layer, a loaded SavedModel's object). Why:
    tf.train.TrackableView takes one and names no class to test for; tf.__internal__ has it."""
    return isinstance(obj, tf.__internal__.tracking.Trackable)


def track(resource, trackable, name):
    """Makes `resource` track `trackable` under `name`. Why: a TrackableResource does not track
    its attributes, and its assets must be saved with it; public alternative: hold them in a
    tf.Module attribute beside it."""
    resource._track_trackable(trackable, name=name)  # pylint: disable=protected-access


def concrete_functions(function):
    """The ConcreteFunctions a restored tf.function was traced with. Why: a restored function lists
    them only through this private method (public: experimental_get_tracing_count, no list)."""
    return list(function._list_all_concrete_functions_for_serialization())  # pylint: disable=protected-access


def tflite_ops(interpreter):
    """Each op of a TFLite model with its name and input and output tensors. Why: the one API
    that lists them; public alternative: tf.lite.experimental.Analyzer, which only prints."""
    return interpreter._get_ops_details()  # pylint: disable=protected-access


def signature_functions(functions):
    """{key: ConcreteFunction} of {key: tf.function or ConcreteFunction} in the form a SavedModel's
    signature has: keyword inputs named as tf.saved_model.save names them, a dict of outputs
    ("output_0", ... for a tensor or a sequence). Why: tf_bnfuse.fold must key an object's
    functions as saving it would; this is the conversion tf.saved_model.save itself applies, and
    no public API exposes it."""
    from tensorflow.python.saved_model import signature_serialization  # pylint: disable=import-outside-toplevel
    return signature_serialization.canonicalize_signatures(functions)[0]


def keras_input_signature(model):
    """The input signature Keras 3's model.export traces a model with (functional, Sequential, or a
    subclassed model from the shapes of its first call). Why: fold(keras_model) keys inputs as
    model.export does; Keras has no public function for it (keras.src.export.export_utils)."""
    from keras.src.export import export_utils  # pylint: disable=import-outside-toplevel
    return export_utils.get_input_signature(model)


def tf_keras_serving_function(model):
    """The tf.function tf-keras' model.save writes as its serving_default signature (inputs named
    after the model's, outputs keyed by its output layers). Why: fold(tf_keras_model) keys them as
    model.save does; tf-keras has no public function for it."""
    from tf_keras.src.saving.legacy import saving_utils  # pylint: disable=import-outside-toplevel
    return saving_utils.trace_model_call(model)


def set_default_save_signature(trackable, function):
    """Makes `function` the signature tf.saved_model.save(trackable, path) writes when it is given
    no signatures. Why: TF looks for it under this private attribute name (what tf-keras sets on
    its models); there is no public way."""
    setattr(trackable, "_default_save_signature", function)


def tflite_subgraphs(content):
    """([(name, [(output tensor names, constant input tensor names) of each op])] of each subgraph,
    {signature key: its subgraph's index}) of a .tflite model's bytes. Why: Model Explorer keys a .tflite's nodes by subgraph name and
    output tensor name (explorer_data.py); the interpreter names no subgraph and lists the
    tensors of the first only, the flatbuffer schema TensorFlow ships has both (no public API)."""
    from tensorflow.lite.python import schema_py_generated as schema  # pylint: disable=import-outside-toplevel
    model, subgraphs = schema.Model.GetRootAs(content, 0), []
    for s in range(model.SubgraphsLength()):
        subgraph = model.Subgraphs(s)
        produced = {subgraph.Operators(o).Outputs(i) for o in range(subgraph.OperatorsLength())
                    for i in range(subgraph.Operators(o).OutputsLength())}
        produced.update(subgraph.Inputs(i) for i in range(subgraph.InputsLength()))

        def names(indices):
            return [subgraph.Tensors(t).Name().decode() for t in indices]

        ops = []
        for o in range(subgraph.OperatorsLength()):
            op = subgraph.Operators(o)
            inputs = [op.Inputs(i) for i in range(op.InputsLength())]
            ops.append((names(op.Outputs(i) for i in range(op.OutputsLength())),
                        names(t for t in inputs if t >= 0 and t not in produced)))
        subgraphs.append(((subgraph.Name() or b"").decode(), ops))
    signatures = {model.SignatureDefs(i).SignatureKey().decode(): model.SignatureDefs(i).SubgraphIndex()
                  for i in range(model.SignatureDefsLength())}
    return subgraphs, signatures
