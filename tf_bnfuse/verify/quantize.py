"""Quantized TFLite: the converter's settings per mode, calibration data, and the metrics a
quantized model is judged by (it is not within float tolerance of the original, by design).

Both sides of the comparison, tf_bnfuse's output and the original SavedModel, are converted
with the same settings and calibration samples and measured on the same held-out inputs.
"""

import dataclasses
import logging
import math
import os
from typing import List, Optional

import numpy as np
import tensorflow as tf

from tf_bnfuse import errors
from tf_bnfuse import report as report_lib
from tf_bnfuse.verify import verification_inputs

_log = logging.getLogger(__name__)

CALIBRATION_SAMPLES = 16  # per signature, when no --calibration_inputs are given


@dataclasses.dataclass
class Quantization:
    """How to quantize: mode (float16, dynamic, int8), the int8 model's I/O type, and the
    calibration samples {signature: {input: array with samples along axis 0}}."""
    mode: str
    io: str = "float"
    calibration: Optional[dict] = None
    calibration_source: str = ""  # for the report: where the samples came from, and how many
    held_out_source: str = ""  # for the report: what the metrics are measured on


@dataclasses.dataclass
class OutputMetric:
    """How far one output of a quantized model is from the original SavedModel's."""
    signature: str
    output: str
    relative_l2_error: float  # ||quantized - original|| / ||original||
    snr_db: float  # 10 log10(||original||^2 / ||quantized - original||^2); inf when equal
    top1_agreement: Optional[float] = None  # rank-2 outputs with more than one class
    # The softmax output whose input (the logits) this measures: log of the original's
    # probabilities and the quantized model's SOFTMAX input, each less its row's mean
    logits_of: Optional[str] = None


@dataclasses.dataclass
class QuantizationReport:
    """The quantized model against the original SavedModel, beside the converter quantizing the
    original alone with the same settings and calibration (TfliteReport has both sides' ops)."""
    mode: str
    io: str
    calibration: str  # where the calibration samples came from, and how many
    held_out: str  # what the metrics are measured on
    metrics: List[OutputMetric] = dataclasses.field(default_factory=list)  # tf_bnfuse's .tflite
    converter_alone_metrics: List[OutputMetric] = dataclasses.field(default_factory=list)
    max_error: Optional[float] = None  # --tflite_max_error

    @property
    def worst(self):
        """The output's OutputMetric with the largest relative L2 error (logits rows aside), or None."""
        return max((m for m in self.metrics if m.logits_of is None), key=lambda m: m.relative_l2_error, default=None)

    @property
    def ok(self):
        return self.max_error is None or self.worst is None or self.worst.relative_l2_error <= self.max_error


def calibration(calibration_inputs, input_specs, random_inputs):
    """(int8 calibration samples {signature: {input: array}}, where they came from) for the
    signatures of input_specs: those of calibration_inputs (--calibration_inputs, a .npz), else
    random_inputs(input_specs), CALIBRATION_SAMPLES each, with a warning."""
    if calibration_inputs is not None:
        samples = verification_inputs.given_inputs(calibration_inputs, input_specs, "{--calibration_inputs}")
        verification_inputs.check_complete(samples, input_specs, "{--calibration_inputs} %s" % (
            "" if not isinstance(calibration_inputs, (str, os.PathLike)) else calibration_inputs))
        samples = {k: samples[k] for k in input_specs}
        counts = {k: sample_count(a) for k, a in samples.items()}
        return samples, "%s (%s samples)" % (
            "the calibration arrays given" if not isinstance(calibration_inputs, (str, os.PathLike))
            else "--calibration_inputs %s" % calibration_inputs, ", ".join("%s %d" % kv for kv in sorted(counts.items())))
    _log.warning("int8 calibration on random inputs, which are not representative of real data: pass "
                 "--calibration_inputs (calibration= in Python) with samples of real inputs for a model worth "
                 "deploying")
    return random_inputs(input_specs), ("%d seeded random samples per signature (no --calibration_inputs): NOT "
                                        "representative of real data" % CALIBRATION_SAMPLES)


def held_out_source(verify_inputs, inputs):
    """For the report: what the metrics are measured on (the verification's inputs)."""
    if verify_inputs is None:
        what = "the verification's seeded test inputs"
    else:
        what = "--verify_inputs %s" % verify_inputs if isinstance(verify_inputs, (str, os.PathLike)) else \
            "the verify_inputs arrays given"
    return "%s (batch %d), not used for calibration" % (what, min(
        (a.shape[0] for arrays in inputs.values() for a in arrays.values() if a.ndim), default=1))


def configure(converter, quantization):
    """Sets the converter up for quantization.mode; None leaves it a float conversion."""
    if quantization is None:
        return converter
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if quantization.mode == "float16":
        converter.target_spec.supported_types = [tf.float16]
    elif quantization.mode == "int8":
        total = sum(sample_count(arrays) for arrays in quantization.calibration.values())
        converter.representative_dataset = lambda: report_lib.progress_bar(
            _samples(quantization.calibration), total, "calibrating")
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        if quantization.io == "int8":
            converter.inference_input_type = tf.int8
            converter.inference_output_type = tf.int8
    return converter


def _samples(calibration):
    """The representative dataset: one sample (batch of 1) at a time, each signature in turn
    (calibration keyed None: the model's one signature)."""
    for key, arrays in calibration.items():
        for i in range(sample_count(arrays)):
            sample = {name: (a[i:i + 1] if a.ndim else a) for name, a in arrays.items()}
            yield sample if key is None else (key, sample)


def sample_count(arrays):
    """The number of samples along axis 0 of one signature's arrays (scalars go with every one)."""
    counts = {a.shape[0] for a in arrays.values() if a.ndim}
    if len(counts) > 1:
        raise errors.BadInputError("{--calibration_inputs}: the inputs of one signature differ in their number of "
                                   "samples (axis 0): %s" % ", ".join(
                                       "%s %d" % (k, a.shape[0]) for k, a in sorted(arrays.items()) if a.ndim))
    return counts.pop() if counts else 1


def run_signature(runner, inputs):
    """Calls a TFLite signature runner with float inputs, quantizing those the model takes as int8
    and dequantizing its int8 outputs: the caller compares floats either way."""
    details = runner.get_input_details()
    fed = {}
    for name, value in inputs.items():
        dtype = details[name]["dtype"]
        scale, zero_point = details[name]["quantization"]
        if np.issubdtype(dtype, np.integer) and scale and np.issubdtype(np.asarray(value).dtype, np.floating):
            info = np.iinfo(dtype)
            value = np.clip(np.round(value / scale + zero_point), info.min, info.max)
        fed[name] = np.asarray(value).astype(dtype)
    outputs = runner(**fed)
    return {name: dequantized(value, runner.get_output_details()[name]["quantization"])
            for name, value in outputs.items()}


def dequantized(value, quantization, dtype=np.float32):
    """A TFLite tensor's value in float: an integer one by its (scale, zero point); one without a
    scale as it is."""
    scale, zero_point = quantization
    return (value.astype(dtype) - zero_point) * scale if scale else value


def logits_metric(key, output, probabilities, logits):
    """The OutputMetric of a softmax output's logits: the original's are log(probabilities), the
    logits up to a constant per row (which softmax ignores; underflowed zeros at float32's
    smallest normal), so both sides are compared less their row means."""
    reference = np.log(np.maximum(np.asarray(probabilities, np.float64), np.finfo(np.float32).tiny))
    actual = np.asarray(logits, np.float64).reshape(reference.shape)
    centred = [a - a.mean(axis=-1, keepdims=True) for a in (reference, actual)]
    metric = output_metric(key, output, *centred)
    metric.logits_of = output
    return metric


def output_metric(key, output, reference, actual):
    reference = np.asarray(reference, dtype=np.float64)
    actual = np.asarray(actual, dtype=np.float64).reshape(reference.shape)
    noise = float(np.sum((actual - reference) ** 2))
    signal = float(np.sum(reference ** 2))
    relative = math.sqrt(noise / signal) if signal else (0.0 if noise == 0 else math.inf)
    snr = math.inf if noise == 0 else (10 * math.log10(signal / noise) if signal else -math.inf)
    top1 = None
    if reference.ndim == 2 and reference.shape[-1] > 1:
        top1 = float(np.mean(np.argmax(reference, -1) == np.argmax(actual, -1)))
    return OutputMetric(key, output, relative, snr, top1)
