"""The TFLite path: convert the folded SavedModel, check the .tflite against the original.

The original SavedModel is the reference: each signature of the .tflite model
runs on the same seeded random inputs as the SavedModel verification, and its
outputs must be within the config's "tflite_tolerance" of the original's (the
TFLite kernels sum in another order than TensorFlow's).
"""

import collections
import dataclasses
import re
from typing import Dict, List, Optional

import tensorflow as tf

from tf_bnfuse import errors
from tf_bnfuse.graph import tf_internal
from tf_bnfuse.verify import compare as verify_lib

LINEAR_TFLITE_OPS = frozenset({"CONV_2D", "CONV_3D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV",
                               "CONV_3D_TRANSPOSE"})
SHAPE_ONLY_TFLITE_OPS = frozenset({"BATCH_TO_SPACE_ND", "RESHAPE", "SQUEEZE", "EXPAND_DIMS"})


@dataclasses.dataclass
class TfliteReport:
    path: str
    size_bytes: int
    ops_after: Dict[str, int]
    batch_norm_ops_after: int  # batch_norm_ops_after_linear of the folded .tflite
    ops_before: Optional[Dict[str, int]] = None  # converting the input SavedModel directly
    batch_norm_ops_before: Optional[int] = None
    before_error: Optional[str] = None  # why converting the input directly failed
    checks: List[verify_lib.OutputCheck] = dataclasses.field(default_factory=list)
    promoted_float16: bool = False  # float16 compute was promoted to float32 before converting

    @property
    def ok(self):
        return all(c.ok for c in self.checks)


def convert(saved_model_dir, signature_keys, tags):
    """The TFLite flatbuffer of a SavedModel (float, no quantization)."""
    converter = tf.lite.TFLiteConverter.from_saved_model(saved_model_dir, signature_keys=list(signature_keys),
                                                         tags=set(tags))
    return converter.convert()


def _ops(interpreter):
    return tf_internal.tflite_ops(interpreter)


def op_counts(model_content):
    interpreter = tf.lite.Interpreter(model_content=model_content)
    return dict(collections.Counter(op["op_name"] for op in _ops(interpreter)))


def batch_norm_ops_after_linear(model_content):
    """MUL/ADD/SUB/DIV a batch norm left after a conv or fully connected op in a .tflite model.

    From each linear op's output, follows single consumers through shape-only
    ops (a dilated conv's BATCH_TO_SPACE_ND, reshapes) and affine ops. Every
    MUL/DIV counts; of the ADD/SUB, the first is the op's own bias and the rest
    count.
    """
    ops = _ops(tf.lite.Interpreter(model_content=model_content))
    consumers = collections.defaultdict(list)
    for op in ops:
        for t in op["inputs"]:
            consumers[t].append(op)
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
        count += scales + max(0, adds - 1)
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


def check(model_content, original, test_inputs, verify_config):
    """Runs every signature of the .tflite model against the original's functions; [OutputCheck].

    test_inputs: {signature: {input: array}}, the ones the SavedModel verification uses.
    """
    interpreter = tf.lite.Interpreter(model_content=model_content)
    available = set(interpreter.get_signature_list())
    tflite_tolerance = verify_config.get("tflite_tolerance", {"rtol": 1e-3, "atol": 1e-5})
    checks = []
    for key in sorted(original):
        inputs = test_inputs[key]
        # A single-signature SavedModel may come out of the converter under another key.
        tflite_key = key if key in available else (next(iter(available)) if len(available) == 1 else None)
        if tflite_key is None:
            raise errors.BnFuseError("the .tflite model has no signature %s" % key)
        actual = interpreter.get_signature_runner(tflite_key)(**inputs)
        with tf.device("/device:CPU:0"):
            def against_original():
                expected = original[key](**{k: tf.constant(v) for k, v in inputs.items()})
                return _checks(key, expected, actual, tflite_tolerance, verify_config)
            found, _ = verify_lib.unless_accepted_as_written(against_original(), against_original,
                                                             lambda found: all(c.ok for c in found))
        checks += found
    return checks


def _checks(key, expected, actual, tflite_tolerance, verify_config):
    checks = []
    for output_key in sorted(expected):
        reference = expected[output_key].numpy()
        # The looser of TFLite's tolerance and the output dtype's (a float16
        # output is only as exact as float16, whoever computes it).
        dtype_tolerance, _ = verify_lib.tolerance_for(expected[output_key].dtype, verify_config)
        tolerance = {k: max(tflite_tolerance[k], dtype_tolerance[k]) for k in ("rtol", "atol")}
        if output_key in actual:
            max_abs, max_rel, ok = verify_lib.compare(reference, actual[output_key], tolerance)
        else:
            max_abs, max_rel, ok = float("inf"), float("inf"), False
        checks.append(verify_lib.OutputCheck(key, output_key, "TFLite interpreter", reference.dtype.name,
                                             max_abs, max_rel, tolerance["rtol"], tolerance["atol"], ok))
    return checks


def build(input_dir, folded_dir, tflite_path, signature_keys, tags, original, test_inputs, verify_config):
    """Converts folded_dir to tflite_path's content (not written here); compares; returns (bytes, report)."""
    try:
        model_content = convert(folded_dir, signature_keys, tags)
    except Exception as e:  # the converter raises many types; the user needs the first line
        raise errors.BadInputError("the TFLite converter cannot convert the folded model: %s" % converter_error(e))
    report = TfliteReport(tflite_path, len(model_content), op_counts(model_content),
                          batch_norm_ops_after_linear(model_content))
    try:
        before = convert(input_dir, signature_keys, tags)
        report.ops_before = op_counts(before)
        report.batch_norm_ops_before = batch_norm_ops_after_linear(before)
    except Exception as e:  # converting the input directly may fail: that is worth reporting, not fatal
        report.before_error = converter_error(e)
    report.checks = check(model_content, original, test_inputs, verify_config)
    return model_content, report
