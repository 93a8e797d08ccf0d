"""A live Python object's functions as a SavedModel's signatures: what tf_bnfuse.fold starts from.

Each kind of object gets the signatures saving it the usual way would write, keyed and named the
same: Keras 3's model.export ("serve" and "serving_default"), tf-keras' model.save
("serving_default", outputs keyed by the output layers), tf.saved_model.save of a tf.Module (one
tf.function with an input signature: "serving_default"; several: each by its attribute name), a
loaded SavedModel's own signatures. The freeze phase takes them from there, as from a SavedModel.
"""

import os
import re

import tensorflow as tf

from tf_bnfuse import errors
from tf_bnfuse.graph import tf_internal
from tf_bnfuse.savedmodel import folded_model
from tf_bnfuse.savedmodel import root_functions

DEFAULT_KEY = "serving_default"


def keras_flavour(obj):
    """"keras", "tf_keras" or None: whose Model class obj is an instance of, by its classes' modules
    (neither package is imported to ask)."""
    for cls in type(obj).__mro__:
        top = cls.__module__.split(".")[0]
        if cls.__name__ == "Model" and top in ("keras", "tf_keras"):
            return top
    return None


def has_root_functions(root):
    """Whether the root object's own tf.functions are kept beside the signatures (a tf.Module's, a
    loaded SavedModel's): a Keras model's (predict_function, ...) are its training loop's."""
    return keras_flavour(root) is None


def _function_key(function):
    """A key for a bare ConcreteFunction: the Python function's name it was traced from."""
    name = function.name.decode() if isinstance(function.name, bytes) else function.name
    name = re.sub(r"^__inference_(.*?)(_\d+)?$", r"\1", name)
    return name or DEFAULT_KEY


def _of_module(obj):
    """{attribute: tf.function} of the tf.functions with an input signature on a tf.Module (or any
    trackable), as tf.saved_model.save would export them."""
    found = {name: function for name, function in root_functions.function_attributes(obj).items()
             if isinstance(function, tf.types.experimental.GenericFunction) and function.input_signature is not None}
    if len(found) == 1:
        return {DEFAULT_KEY: next(iter(found.values()))}
    return found


def described(obj):
    return "%s.%s" % (type(obj).__module__, type(obj).__name__)


def _functions(obj):
    """(root trackable, {key: tf.function or ConcreteFunction}) of obj, before canonicalization."""
    if isinstance(obj, (str, bytes, os.PathLike)):
        raise errors.BadInputError("fold takes a live model or function, not a path: for a SavedModel folder call "
                                   "tf_bnfuse.fold_saved_model(%r, output_dir), or fold(tf.saved_model.load(%r))"
                                   % (os.fspath(obj), os.fspath(obj)))
    if isinstance(obj, tf.types.experimental.ConcreteFunction):
        return None, {DEFAULT_KEY: obj}
    if isinstance(obj, (list, tuple)) and obj and all(isinstance(f, tf.types.experimental.ConcreteFunction)
                                                      for f in obj):
        keys = [_function_key(f) for f in obj]
        if len(set(keys)) < len(keys):
            keys = [DEFAULT_KEY] + ["%s_%d" % (k, i) for i, k in enumerate(keys) if i]
        return None, dict(zip(keys, obj))
    flavour = keras_flavour(obj)
    if flavour is not None and not obj.built:
        raise errors.BadInputError("the %s model has not been built: call it once (or build it) before "
                                   "folding it" % described(obj))
    if flavour == "keras":
        import keras  # pylint: disable=import-outside-toplevel
        archive = keras.export.ExportArchive()  # what model.export writes, traced the same way
        serve = archive.track_and_add_endpoint("serve", obj, tf_internal.keras_input_signature(obj))
        return obj, {"serve": serve, DEFAULT_KEY: serve}
    if flavour == "tf_keras":
        return obj, {DEFAULT_KEY: tf_internal.tf_keras_serving_function(obj)}
    signatures = getattr(obj, "signatures", None)
    if signatures is not None and len(signatures):  # a loaded SavedModel: already signatures
        return obj, dict(signatures)
    if tf_internal.is_trackable(obj):  # a tf.Module, or any other trackable
        found = _of_module(obj)
        if found:
            return obj, found
        raise errors.BadInputError("%s has no tf.function with an input_signature to fold; give one, or pass "
                                   "signatures={key: concrete function}" % described(obj))
    raise errors.BadInputError("cannot fold a %s: give a Keras model, a tf.Module, a loaded SavedModel, or "
                               "ConcreteFunction(s)" % described(obj))


def signatures_of(obj, signatures=None):
    """(root, {key: ConcreteFunction in signature form}, {key: [input names in positional
    order]}) of what tf_bnfuse.fold is given.

    root: the trackable that owns the variables and tables the functions read (for bare concrete
    functions, a tf.Module holding the variables they capture). signatures: as
    tf.saved_model.save takes it (a function, or {key: function}), instead of the object's own.
    The positional order is the function's own (a Keras model's inputs, in its order), for the
    keys whose functions take their inputs by position. Raises BadInputError naming what cannot
    be folded.
    """
    if signatures is not None:
        root = obj
        functions = signatures if isinstance(signatures, dict) else {DEFAULT_KEY: signatures}
    else:
        root, functions = _functions(obj)
    bad = sorted(k for k, f in functions.items() if not isinstance(f, root_functions.FUNCTION_KINDS))
    if bad:
        raise errors.BadInputError("signature %s is no tf.function or ConcreteFunction" % ", ".join(bad))
    if all(_in_signature_form(f) for f in functions.values()):  # a loaded SavedModel's: as the CLI takes them
        return (root if root is not None else variables_owner(functions)), dict(functions), {}
    first_key = {}  # id(function) -> the first key it is given under: one signature function for all
    for key, function in functions.items():
        first_key.setdefault(id(function), key)
    try:
        distinct = tf_internal.signature_functions({k: functions[k] for k in first_key.values()})
    except (ValueError, TypeError) as e:
        raise errors.BadInputError("cannot make signatures of %s: %s" % (described(obj), errors.first_line(e)))
    concrete = {key: distinct[first_key[id(function)]] for key, function in functions.items()}
    order = {key: _positional_names(functions[key], concrete[key]) for key in concrete}
    return (root if root is not None else variables_owner(concrete)), concrete, {
        key: names for key, names in order.items() if names}


def _positional_names(function, signature):
    """The signature's input names in the order `function` takes them by position (a Keras
    model's list of inputs flattened), or None where it takes them otherwise."""
    specs = (function.structured_input_signature[0] if isinstance(function, tf.types.experimental.ConcreteFunction)
             else getattr(function, "input_signature", None))
    names = [spec.name for spec in tf.nest.flatten(specs or ()) if isinstance(spec, tf.TensorSpec)]
    keyword = folded_model.keyword_input_specs(signature)
    return names if len(names) > 1 and sorted(names) == sorted(keyword) else None


def _in_signature_form(function):
    """Whether a function is a SavedModel signature already (keyword inputs, a dict of outputs)."""
    if not isinstance(function, tf.types.experimental.ConcreteFunction):
        return False
    args, kwargs = function.structured_input_signature
    return not args and bool(kwargs) and isinstance(function.structured_outputs, dict)


def variables_owner(functions):
    """A tf.Module holding the variables bare functions capture: the trackable the freeze phase
    finds them on (and the output saves)."""
    root = tf.Module()
    root.captured_variables = list({id(v): v for f in functions.values() for v in f.graph.variables}.values())
    return root


def returns_tensor(obj, functions):
    """Whether obj, called, returns one tensor where its serving signature returns a dict of one
    output: a function whose one output tf.saved_model.save names output_0 (it was a bare
    tensor: Keras 3's too), or a tf-keras model with one output (a tf-keras functional model with
    a dict of one output is taken for one tensor too)."""
    function = functions.get(DEFAULT_KEY) or (next(iter(functions.values())) if len(functions) == 1 else None)
    if function is None or len(function.structured_outputs) != 1:
        return False
    # tf-keras keys even a bare tensor by its output layer ("output_1" for a subclassed model)
    return list(function.structured_outputs) == ["output_0"] or (
        keras_flavour(obj) == "tf_keras" and len(obj.outputs or [None]) == 1)
