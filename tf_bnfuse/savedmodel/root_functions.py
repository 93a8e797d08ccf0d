"""The tf.functions of a SavedModel's root object besides its signatures (Keras 3's `loaded.serve`).

A signature is usually a thin wrapper: its graph calls one root function's
concrete function (a trace) with the signature's inputs and returns that
call's outputs under its own keys (or the trace and the signature both only
pass their arguments on to one function: signature_relation). Such a trace
computes exactly what its signature computes, so the output keeps it by calling
the folded signature function, with the root function's own positional
structure and defaults; the verification shows the output's does the same by
the same relation (runs_signature) instead of calling it again. A
trace no signature calls is kept the same way when, on the signature's test
inputs, it computes the signature's outputs (tf-keras' `__call__` beside its
own serving graph). Traces that write variables, or that no signature
computes, are not kept, and are reported with why.
"""

import dataclasses
import inspect
from typing import Dict, List

import tensorflow as tf

from tf_bnfuse import graph as graph_lib
from tf_bnfuse.graph import tf_internal
from tf_bnfuse.savedmodel import resources

FUNCTION_KINDS = (tf.types.experimental.GenericFunction, tf.types.experimental.ConcreteFunction)


@dataclasses.dataclass
class RootAlias:
    """One concrete function of a root function, served by a signature's folded function."""
    name: str  # the root object's attribute
    input_signature: tuple  # (args, kwargs) as the concrete function was traced: TensorSpecs and Python values
    signature: str  # the signature key whose function computes it
    arg_keys: List[str]  # for each flat tensor argument, the signature input it is
    output_keys: List[str]  # for each flat output, the signature output that returns it
    structured_outputs: object  # how the flat outputs nest
    output_ports: Dict[str, int]  # each signature output -> the flat output it returns
    # True when the signature's graph does not call this function but computes the same
    # outputs from the same inputs, as measured on the test inputs (tf-keras' __call__ with
    # training=False beside its own serving_default graph)
    by_value: bool = False
    parameters: object = None  # inspect.Signature of the original function, when it has a plain one
    # signature_relation of the original's trace and signature, where the signature only calls it
    relation: object = None


# tf-keras writes these for keras.models.load_model's revival of the layer; tf.saved_model.load
# callers use __call__. The output keeps no Keras metadata, so nothing could call them.
KERAS_LOADER_ONLY = frozenset({"call_and_return_all_conditional_losses", "call_and_return_conditional_losses"})


def function_attributes(obj):
    """{name: function} of the public tf.function attributes of an object (and `__call__`): its
    own (a loaded SavedModel's) and its class's (methods decorated with tf.function), bound to it."""
    raw = {}
    for owner in reversed(type(obj).__mro__):
        raw.update(vars(owner))
    raw.update(vars(obj))
    return {name: getattr(obj, name) for name, value in sorted(raw.items())
            if isinstance(value, FUNCTION_KINDS) and (not name.startswith("_") or name == "__call__")}


def _names(loaded):
    return list(function_attributes(loaded))


def _concrete_functions(function):
    if isinstance(function, tf.types.experimental.ConcreteFunction):
        return [function]
    return tf_internal.concrete_functions(function)


def _function_name(concrete):
    name = concrete.name
    return name.decode() if isinstance(name, bytes) else name


def _alias(name, concrete, key, signature):
    """A RootAlias when signature `key` only runs what `concrete` runs, with the trace's tensor
    arguments and returning its outputs (signature_relation: the signature's graph calls the
    trace's function, or both call one function), else None."""
    relation = signature_relation(concrete, signature)
    if relation is None:
        return None
    arguments, outputs = relation
    flat_specs = [s for s in tf.nest.flatten(concrete.structured_input_signature) if isinstance(s, tf.TensorSpec)]
    flat_outputs = tf.nest.flatten(concrete.structured_outputs, expand_composites=True)
    if len(flat_specs) != len(arguments) or len(flat_outputs) != len(concrete.outputs):
        return None
    output_ports = {k: port for port, keys in enumerate(outputs) for k in keys}
    if sorted(output_ports) != sorted(signature.structured_outputs):
        return None  # the signature returns something the trace does not
    return RootAlias(name, concrete.structured_input_signature, key, [arguments[i] for i in range(len(arguments))],
                     [keys[0] for keys in outputs], concrete.structured_outputs, output_ports, relation=relation)


def find(loaded, signatures):
    """({name: [RootAlias]}, {name: why (part of) it is not kept}, {name: [ConcreteFunction]}).

    signatures: {key: ConcreteFunction}, the signatures being folded. A trace
    (concrete function) of a root function is kept when a signature only wraps
    it. A trace that writes variables (tf-keras' training=True call updates the
    batch-norm statistics the signatures freeze) is not kept. The rest are
    returned pending, for match_by_value once there are test inputs.
    """
    aliases, dropped, pending = {}, {}, {}
    for name in _names(loaded):
        if name in KERAS_LOADER_ONLY:
            dropped[name] = ("%s: only Keras' own loader calls it, and the output does not keep the Keras "
                             "metadata that loader needs" % name)
            continue
        function = getattr(loaded, name)
        parameters = parameters_of(function)
        for concrete in _concrete_functions(function):
            alias = next((a for a in (_alias(name, concrete, k, f) for k, f in sorted(signatures.items()))
                          if a is not None), None)
            if alias is not None:
                alias.parameters = parameters
                aliases.setdefault(name, []).append(alias)
            elif resources.written_placeholders(concrete.graph.as_graph_def()):
                not_kept(dropped, name, concrete, "it writes variables (a training-mode call)")
            else:
                pending.setdefault(name, []).append(concrete)
    return aliases, dropped, pending


def not_kept(dropped, name, concrete, why):
    reason = "%s%s: %s" % (name, describe(concrete.structured_input_signature), why)
    dropped[name] = "%s; %s" % (dropped[name], reason) if name in dropped else reason


def parameters_of(function):
    """The inspect.Signature a restored function was written with (tf-keras' `__call__(inputs,
    training=False, mask=None)`), so that the output's function takes the same defaults."""
    spec = getattr(getattr(function, "function_spec", None), "fullargspec", None)
    if spec is None or spec.varargs or spec.varkw or spec.kwonlyargs:
        return None
    defaults = list(spec.defaults or ())
    first_default = len(spec.args) - len(defaults)
    return inspect.Signature([
        inspect.Parameter(arg, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                          default=defaults[i - first_default] if i >= first_default else inspect.Parameter.empty)
        for i, arg in enumerate(spec.args)])


def describe(input_signature):
    args, kwargs = input_signature
    parts = ["tensor" if isinstance(a, tf.TensorSpec) else repr(a) for a in tf.nest.flatten(args)]
    parts += ["%s=%s" % (k, "tensor" if isinstance(v, tf.TensorSpec) else repr(v)) for k, v in sorted(kwargs.items())]
    return "(%s)" % ", ".join(parts)


def _skeleton(structure):
    """The structure with each tensor replaced by one marker: what tells two traces apart."""
    return repr(tf.nest.map_structure(
        lambda x: "<tensor>" if isinstance(x, (tf.Tensor, tf.TensorSpec)) else x, structure))


def attach(module, aliases, written):
    """Sets on `module` one tf.function per kept root function, calling the written signature functions.

    written: {signature key: the function that module's signature runs}.
    """
    for name, group in aliases.items():
        function = tf.function(_dispatcher(group, written), autograph=False)
        for alias in group:
            args, kwargs = alias.input_signature
            function.get_concrete_function(*args, **kwargs)  # traced, so that the SavedModel has it
        setattr(module, name, function)


def _dispatcher(group, written):
    """The Python function a kept root function traces: each trace calls its alias's signature."""
    by_skeleton = {_skeleton(a.input_signature): a for a in group}
    parameters = group[0].parameters

    def call(*args, **kwargs):
        if parameters is not None:  # the original's defaults, and its traces' positional form
            bound = parameters.bind(*args, **kwargs)
            bound.apply_defaults()
            args, kwargs = tuple(bound.args), dict(bound.kwargs)
        alias = by_skeleton[_skeleton((args, kwargs))]
        tensors = [t for t in tf.nest.flatten((args, kwargs)) if isinstance(t, tf.Tensor)]
        result = written[alias.signature](**dict(zip(alias.arg_keys, tensors)))
        return tf.nest.pack_sequence_as(alias.structured_outputs, [result[k] for k in alias.output_keys],
                                        expand_composites=True)

    if parameters is not None:
        call.__signature__ = parameters
    return call


def call_tensors(function, alias, feeds):
    tensors = iter([feeds[k] for k in alias.arg_keys])
    args, kwargs = tf.nest.map_structure(
        lambda x: next(tensors) if isinstance(x, tf.TensorSpec) else x, alias.input_signature)
    return tf.nest.flatten(function(*args, **kwargs), expand_composites=True)


def runs_signature(function, alias, signature):
    """Whether `function` (a root function of the written output, loaded), traced as `alias`,
    runs what `signature` (its signature's ConcreteFunction) runs, as the original's root
    function ran what the original's signature runs: both graphs call one function, the
    arguments and outputs related as alias.relation has them (signature_relation of the
    original's, read before anything was folded), and the captured variables the same. Calling
    one then computes what calling the other does. False where that is not shown: it is called."""
    args, kwargs = alias.input_signature
    try:
        concrete = function.get_concrete_function(*args, **kwargs)
    except (ValueError, TypeError):
        return False
    return alias.relation is not None and signature_relation(concrete, signature) == alias.relation


def signature_relation(concrete, signature):
    """How a ConcreteFunction relates to a signature's (ConcreteFunction) when both graphs run one
    function, the same (_common_callee): ({tensor argument index: the signature input it is},
    [for each output: the signature outputs it is]), every argument of that function either
    one argument of each or a captured tensor both pass on. None otherwise."""
    found = _common_callee(concrete, signature)
    if found is None:
        return None
    (served_arguments, served_ports), (signed_arguments, signed_ports) = found
    input_keys, output_keys = sorted(signature.structured_input_signature[1]), sorted(signature.structured_outputs)
    if _explicit(signature) != len(input_keys) or len(signed_ports) != len(output_keys):
        return None
    if len(served_arguments) != len(signed_arguments):
        return None
    arguments = {}
    for served_input, signed_input in zip(served_arguments, signed_arguments):
        served_kind, served_value = _input_of(concrete, served_input)
        signed_kind, signed_value = _input_of(signature, signed_input)
        if served_kind != signed_kind or (served_kind == "captured" and served_value is not signed_value):
            return None
        if served_kind == "input":
            if arguments.setdefault(served_value, input_keys[signed_value]) != input_keys[signed_value]:
                return None
    if sorted(arguments) != list(range(_explicit(concrete))):
        return None  # an argument the call does not read
    outputs = [sorted(k for k, port in zip(output_keys, signed_ports) if port == served_port)
               for served_port in served_ports]
    return (arguments, outputs) if all(outputs) else None


def _common_callee(first, second):
    """((arguments, ports) of first, the same of second) for the first function both
    ConcreteFunctions run, each seen through functions that only forward their arguments to a
    call (graph.forwarded_call): arguments maps that function's arguments to the concrete
    function's inputs, ports the concrete function's outputs to its outputs. Each side is
    followed a call at a time, in turn, so that the common function's own body (a model's) is
    not read; where there is none in common, each side is followed to its end. None then."""
    sides = [_callees(first), _callees(second)]
    seen = [{}, {}]
    while sides[0] or sides[1]:
        for i in (0, 1):
            step = next(sides[i], None) if sides[i] else None
            if step is None:
                sides[i] = None
                continue
            name, mapping = step
            seen[i].setdefault(name, mapping)
            if name in seen[1 - i]:
                return (seen[0][name], seen[1][name])
    return None


def _callees(concrete):
    """(function name, (arguments, ports)) of the concrete function itself, then, one at a time as
    they are asked for, of the function each function on the way only forwards to. A function's
    body is read only to go past it (a model's, which computes, is not read: the concrete
    function's own graph is looked at op by op first, unserialized)."""
    name = _function_name(concrete)
    arguments, ports = list(range(len(concrete.inputs))), list(range(len(concrete.outputs)))
    passing = graph_lib.CALL_OPS | graph_lib.FORWARDING_OPS | {"Placeholder"}
    function_def = concrete.function_def if all(op.type in passing for op in concrete.graph.get_operations()) \
        else None
    if function_def is not None and (len(function_def.signature.input_arg) != len(concrete.inputs)
                                     or len(function_def.signature.output_arg) != len(concrete.outputs)):
        return
    seen = set()
    while name not in seen:
        seen.add(name)
        yield name, (arguments, ports)
        if function_def is None:
            function_def = tf_internal.library_function_def(concrete.graph, name) if len(seen) > 1 else None
        found = graph_lib.forwarded_call(function_def) if function_def is not None else None
        if found is None:
            return
        name, inner_arguments, inner_ports = found
        arguments, ports = [arguments[i] for i in inner_arguments], [inner_ports[p] for p in ports]
        function_def = None


def _explicit(concrete):
    return len(concrete.inputs) - len(concrete.captured_inputs)


def _input_of(concrete, index):
    """("input", its index among the tensor arguments) or ("captured", the captured tensor) of
    input `index` of a ConcreteFunction."""
    explicit = _explicit(concrete)
    return ("input", index) if index < explicit else ("captured", concrete.captured_inputs[index - explicit])
