"""The TFLite path: convert the folded SavedModel, check the .tflite against the original.

The original SavedModel is the reference: each signature of the .tflite model
runs on the same seeded random inputs as the SavedModel verification, and its
outputs must be within the config's "tflite_tolerance" of the original's (the
TFLite kernels sum in another order than TensorFlow's).
"""

import collections
import contextlib
import dataclasses
import importlib.metadata
import re
import warnings
from typing import Dict, List, Optional

import numpy as np
import tensorflow as tf

from tf_bnfuse import errors
from tf_bnfuse.graph import tf_internal
from tf_bnfuse.savedmodel import folded_model
from tf_bnfuse.savedmodel import objects as objects_lib
from tf_bnfuse.verify import execution
from tf_bnfuse.verify import records
from tf_bnfuse.verify import tolerance as tolerance_lib
from tf_bnfuse.verify import quantize as quantize_lib

LINEAR_TFLITE_OPS = frozenset({"CONV_2D", "CONV_3D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV",
                               "CONV_3D_TRANSPOSE"})
# Ops between a linear op and its batch norm that change no value's meaning: shapes, and the
# (de)quantization around a linear op that a quantized model runs in float (CONV_3D in int8).
SHAPE_ONLY_TFLITE_OPS = frozenset({"BATCH_TO_SPACE_ND", "RESHAPE", "SQUEEZE", "EXPAND_DIMS", "QUANTIZE",
                                   "DEQUANTIZE"})


@dataclasses.dataclass
class TfliteReport:
    path: str
    size_bytes: int
    ops: Dict[str, int]
    batch_norm_ops: int  # batch_norm_ops_next_to_linear of the folded .tflite
    converter_alone_ops: Optional[Dict[str, int]] = None  # converting the input SavedModel directly
    converter_alone_batch_norm_ops: Optional[int] = None
    converter_alone_size_bytes: Optional[int] = None
    converter_alone_error: Optional[str] = None  # why converting the input directly failed
    checks: List[records.OutputCheck] = dataclasses.field(default_factory=list)
    promoted_float16: bool = False  # float16 compute was promoted to float32 before converting
    quantization: Optional[quantize_lib.QuantizationReport] = None  # --tflite_quantize other than none
    runtime: str = ""  # the interpreter the .tflite model was run on (runtime())
    explorer_data: Optional[object] = None  # report.ExplorerData, with --explorer_data

    @property
    def ok(self):
        return all(c.ok for c in self.checks) and (self.quantization is None or self.quantization.ok)


@contextlib.contextmanager
def _without_interpreter_deprecation():
    """Keeps tf.lite.Interpreter's deprecation warning off the user's stderr where LiteRT is not
    installed (the warning points to it); the converter's int8 calibration makes one too."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*tf.lite.Interpreter is deprecated", category=UserWarning)
        # LiteRT's note that keeping every tensor is for debugging: asked for, for the logits only
        warnings.filterwarnings("ignore", message=".*experimental_preserve_all_tensors", category=UserWarning)
        yield


def runtime():
    """(what the report calls it, its Interpreter class): Google's standalone LiteRT runtime
    (ai-edge-litert, the `litert` extra), where users run .tflite models, when it is installed;
    otherwise TensorFlow's own tf.lite.Interpreter, deprecated in TensorFlow 2.21."""
    try:
        from ai_edge_litert import interpreter as litert  # pylint: disable=import-outside-toplevel
    except ImportError:
        return "tf.lite.Interpreter of TensorFlow %s" % tf.__version__, tf.lite.Interpreter
    return "LiteRT %s (ai-edge-litert)" % importlib.metadata.version("ai-edge-litert"), litert.Interpreter


def interpreter_of(model_content, preserve_all_tensors=False):
    """An interpreter of the model; preserve_all_tensors keeps intermediate tensors readable
    after a run (a softmax's input: the logits)."""
    with _without_interpreter_deprecation():
        return runtime()[1](model_content=model_content, experimental_preserve_all_tensors=preserve_all_tensors)


def saved_model_converter(saved_model_dir, signature_keys, tags):
    """A function that makes a TFLiteConverter of these signatures of a SavedModel on disk."""
    return lambda: tf.lite.TFLiteConverter.from_saved_model(saved_model_dir, signature_keys=list(signature_keys),
                                                            tags=set(tags))


def functions_converter(functions, trackable=None):
    """A function that makes a TFLiteConverter of {signature key: ConcreteFunction} in memory
    (TFLiteConverter.from_concrete_functions), through a SavedModel of the trackable that owns
    their variables, so that the .tflite has signatures: one function is keyed
    "serving_default", several by their graphs' names (each is first traced under its key where
    its graph is named otherwise). Signatures that are one function are converted once (as from
    a SavedModel). Without a trackable (the converter alone, for the side-by-side table), a
    tf.Module holds their variables: the input object itself would not do (a Keras model's
    training functions mark its variables written, and they stay READ_VARIABLE ops that int8
    fails on); and converting a frozen graph instead was slower."""
    distinct = {}
    for key, function in functions.items():
        distinct.setdefault(id(function), (key, function))
    named = [function if len(distinct) == 1 or function.graph.name == key else _named(key, function)
             for key, function in distinct.values()]
    if trackable is None:
        trackable = objects_lib.variables_owner(dict(enumerate(named)))
    return lambda: tf.lite.TFLiteConverter.from_concrete_functions(named, trackable)


def _named(key, function):
    """A ConcreteFunction whose graph is named `key` that calls `function` (a signature's)."""
    def call(**inputs):
        return function(**inputs)
    call.__name__ = key
    return tf.function(call, autograph=False).get_concrete_function(**folded_model.keyword_input_specs(function))


def convert(converter, quantization=None):
    """The TFLite flatbuffer of what converter() converts: float, or quantized as a quantize.Quantization says."""
    if quantization is not None and quantization.calibration is not None:
        quantization = _keyed_as_converted(quantization, converter)
    with _without_interpreter_deprecation():
        return quantize_lib.configure(converter(), quantization).convert()


def _keyed_as_converted(quantization, converter):
    """quantization with its calibration keyed by the signatures the converter writes. It may write
    fewer than it is given (Keras 3's serve and serving_default as one; a signature whose outputs
    another returns too): a float conversion tells which; one signature is keyed None."""
    with _without_interpreter_deprecation():
        available = list(interpreter_of(converter().convert()).get_signature_list())
    calibration = {}
    for key, arrays in sorted(quantization.calibration.items()):
        target = key if key in available else (available[0] if len(available) == 1 else None)
        if target is None:
            raise errors.BnFuseError("the TFLite converter wrote no signature %s (it wrote %s): cannot "
                                     "calibrate it" % (key, ", ".join(available)))
        calibration.setdefault(None if len(available) == 1 else target, arrays)
    return dataclasses.replace(quantization, calibration=calibration)


def _ops(interpreter):
    return tf_internal.tflite_ops(interpreter)


def op_counts(model_content):
    interpreter = interpreter_of(model_content)
    return dict(collections.Counter(op["op_name"] for op in _ops(interpreter)))


def batch_norm_ops_next_to_linear(model_content):
    """MUL/ADD/SUB/DIV a batch norm left next to a conv or fully connected op in a .tflite model.

    After each linear op: follows single consumers from its output through shape-only
    ops (a dilated conv's BATCH_TO_SPACE_ND, reshapes, (de)quantization) and affine ops; every MUL/DIV
    counts, and of the ADD/SUB, the first is the op's own bias and the rest count.
    Before it: follows producers from its data input through shape-only ops and affine
    ops by a constant (a batch norm between a pool and a conv), each of whose output
    only that path reads; each counts.
    """
    ops = _ops(interpreter_of(model_content))
    consumers, producer = collections.defaultdict(list), {}
    for op in ops:
        for t in op["inputs"]:
            consumers[t].append(op)
        for t in op["outputs"]:
            producer[t] = op
    count = 0
    for op in ops:
        if op["op_name"] not in LINEAR_TFLITE_OPS or len(op["outputs"]) != 1:
            continue
        tensor, scales, adds = op["outputs"][0], 0, 0
        while len(consumers[tensor]) == 1 and len(consumers[tensor][0]["outputs"]) == 1:
            consumer = consumers[tensor][0]
            if consumer["op_name"] in ("MUL", "DIV"):
                scales += 1
            elif consumer["op_name"] in ("ADD", "SUB"):
                adds += 1
            elif consumer["op_name"] not in SHAPE_ONLY_TFLITE_OPS:
                break
            tensor = consumer["outputs"][0]
        count += scales + max(0, adds - 1) + _affine_ops_feeding(op["inputs"][0], producer, consumers)
    return count


def _affine_ops_feeding(tensor, producer, consumers):
    """How many affine ops by a constant (an input no op produces) feed `tensor`, on a path of
    single consumers through shape-only ops."""
    count = 0
    while tensor in producer and len(consumers[tensor]) == 1:
        op = producer[tensor]
        if op["op_name"] in SHAPE_ONLY_TFLITE_OPS:
            tensor = op["inputs"][0]
            continue
        if op["op_name"] not in ("MUL", "DIV", "ADD", "SUB"):
            break
        data = [t for t in op["inputs"] if t in producer]
        if len(data) != 1:
            break
        count, tensor = count + 1, data[0]
    return count


def converter_error(exc):
    """The part of a TFLite converter error a user can act on, on one line.

    The converter prefixes the cause with "Could not translate MLIR to
    FlatBuffer." and MLIR locations; the cause is the "'tf.Op' op ..." message.
    """
    text = str(exc)
    cause = re.search(r"'(?:tf|tfl)\.[A-Za-z0-9_]+' op [^\n]*", text)
    if cause:
        return cause.group(0).strip()
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _runner(interpreter, key):
    """The signature runner of `key`; a single-signature SavedModel may come out of the converter
    under another key."""
    available = set(interpreter.get_signature_list())
    tflite_key = key if key in available else (next(iter(available)) if len(available) == 1 else None)
    if tflite_key is None:
        raise errors.BnFuseError("the .tflite model has no signature %s" % key)
    return interpreter.get_signature_runner(tflite_key)


def check(model_content, original, test_inputs, verify_config, known=None):
    """Runs every signature of the .tflite model against the original's functions; [OutputCheck].

    test_inputs: {signature: {input: array}}, the ones the SavedModel verification uses.
    known: {signature: {output: array}}: the original's outputs on those inputs on the CPU where
    the verification already has them (compare.Expected.seen), not computed again.
    """
    interpreter = interpreter_of(model_content)
    tflite_tolerance = verify_config.get("tflite_tolerance", {"rtol": 1e-3, "atol": 1e-5})
    checks = []
    for key in sorted(original):
        inputs = test_inputs[key]
        actual = _runner(interpreter, key)(**inputs)
        with tf.device("/device:CPU:0"):
            def against_original():
                expected = original[key](**{k: tf.constant(v) for k, v in inputs.items()})
                return _checks(key, {k: v.numpy() for k, v in expected.items()}, actual, tflite_tolerance,
                               verify_config)
            first = (_checks(key, known[key], actual, tflite_tolerance, verify_config) if key in (known or {})
                     else against_original())
            found, _ = execution.unless_accepted_as_written(first, against_original,
                                                             lambda found: all(c.ok for c in found))
        checks += found
    return checks


def _checks(key, expected, actual, tflite_tolerance, verify_config):
    """[OutputCheck] of one signature's TFLite outputs against the original's ({output: array})."""
    checks = []
    for output_key in sorted(expected):
        reference = np.asarray(expected[output_key])
        # The looser of TFLite's tolerance and the output dtype's (a float16
        # output is only as exact as float16, whoever computes it).
        dtype_tolerance, _ = tolerance_lib.tolerance_for(tf.string if reference.dtype == object else reference.dtype,
                                                      verify_config)
        tolerance = {k: max(tflite_tolerance[k], dtype_tolerance[k]) for k in ("rtol", "atol")}
        if output_key in actual:
            max_abs, max_rel, ok = tolerance_lib.compare(reference, actual[output_key], tolerance)
        else:
            max_abs, max_rel, ok = float("inf"), float("inf"), False
        checks.append(records.OutputCheck(key, output_key, "TFLite interpreter", reference.dtype.name,
                                             max_abs, max_rel, tolerance["rtol"], tolerance["atol"], ok))
    return checks


def quantization_metrics(model_content, references, held_out):
    """[OutputMetric] of a quantized .tflite model against the original's outputs on held_out inputs.

    references: {signature: {output: array}}, the original SavedModel's outputs on held_out.
    An output a SOFTMAX computes is measured on its logits too (OutputMetric.logits_of): a
    quantized softmax over nearly equal values ties in its 256 levels and loses the order its
    input has, so a top-1 figure from the probabilities alone misleads.
    """
    interpreter = interpreter_of(model_content)
    ops, metrics = _ops(interpreter), []
    logits = {key: _softmax_inputs(ops, _runner(interpreter, key).get_output_details()) for key in references}
    if any(logits.values()):  # every tensor kept (more memory) only where there are logits to read
        interpreter = interpreter_of(model_content, preserve_all_tensors=True)
    for key in sorted(references):
        actual = quantize_lib.run_signature(_runner(interpreter, key), held_out[key])
        for output in sorted(references[key]):
            metrics.append(quantize_lib.output_metric(key, output, references[key][output], actual[output]))
            if output in logits[key]:
                metrics.append(quantize_lib.logits_metric(key, output, references[key][output],
                                                          _dequantized(interpreter, logits[key][output])))
    return metrics


def _softmax_inputs(ops, output_details):
    """{output name: index of the tensor a SOFTMAX computes it from} for the outputs a SOFTMAX
    computes (through (de)quantization and reshapes)."""
    producer = {t: op for op in ops for t in op["outputs"]}
    found = {}
    for name, details in output_details.items():
        op = producer.get(details["index"])
        while op is not None and op["op_name"] in SHAPE_ONLY_TFLITE_OPS:
            op = producer.get(op["inputs"][0])
        if op is not None and op["op_name"] == "SOFTMAX":
            found[name] = op["inputs"][0]
    return found


def _dequantized(interpreter, index):
    """A tensor of the last run, in float (an int8 tensor by its scale and zero point)."""
    [details] = [d for d in interpreter.get_tensor_details() if d["index"] == index]
    return quantize_lib.dequantized(interpreter.get_tensor(index), details["quantization"], np.float64)


def reference_outputs(original, inputs):
    """{signature: {output: array}}: the original SavedModel's functions on `inputs`, on the CPU."""
    with tf.device("/device:CPU:0"):
        return {key: {k: v.numpy() for k, v in original[key](**{n: tf.constant(a) for n, a in inputs[key].items()}
                                                              ).items()} for key in sorted(original)}


def build(input_converter, folded_converter, tflite_path, original, test_inputs, verify_config,
          quantization=None, held_out=None, known=None, step=lambda what: None):
    """Converts the folded model (folded_converter makes its TFLiteConverter) to tflite_path's
    content (not written here); compares; returns (bytes, report).

    Float (quantization None): each output within tolerance of the original on test_inputs.
    Quantized: per-output metrics on held_out inputs, for the folded model and for the input
    converted alone with the same settings (input_converter; report.quantization).
    known: check's. step(what) is called as each step starts (the progress lines).
    """
    how = "" if quantization is None else " (%s%s)" % (quantization.mode, ", calibrating" if quantization.calibration
                                                         is not None else "")
    step("converting the folded model%s" % how)
    try:
        model_content = convert(folded_converter, quantization)
    except Exception as e:  # the converter raises many types; the user needs the first line
        raise errors.BadInputError("the TFLite converter cannot convert the folded model: %s" % converter_error(e))
    report = TfliteReport(tflite_path, len(model_content), op_counts(model_content),
                          batch_norm_ops_next_to_linear(model_content), runtime=runtime()[0])
    before = None
    step("converting the input with the converter alone%s, for comparison" % how)
    try:
        before = convert(input_converter, quantization)
        report.converter_alone_ops, report.converter_alone_size_bytes = op_counts(before), len(before)
        report.converter_alone_batch_norm_ops = batch_norm_ops_next_to_linear(before)
    except Exception as e:  # converting the input directly may fail: that is worth reporting, not fatal
        report.converter_alone_error = converter_error(e)
    if quantization is None:
        step("checking the .tflite model against the original on %s" % report.runtime)
        report.checks = check(model_content, original, test_inputs, verify_config, known)
        return model_content, report
    step("measuring the quantized model against the original on held-out inputs")
    references = reference_outputs(original, held_out)
    report.quantization = quantize_lib.QuantizationReport(quantization.mode, quantization.io,
                                                          quantization.calibration_source, quantization.held_out_source)
    report.quantization.metrics = quantization_metrics(model_content, references, held_out)
    if before is not None:
        step("measuring the converter alone's model on the same inputs")
        report.quantization.converter_alone_metrics = quantization_metrics(before, references, held_out)
    return model_content, report
