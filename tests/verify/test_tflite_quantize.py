"""--tflite_quantize: the quantized .tflite model is what was asked for, and its reported metrics
are the ones the test computes itself, with TFLite's interpreter against the original SavedModel.

The CLI runs in a subprocess, as a user runs it; each Keras flavour builds its models in a
process of its own (tf-keras through model_zoo.py).
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from ai_edge_litert.interpreter import Interpreter  # the runtime users deploy .tflite models on

import keras
import model_zoo
from cli_checks import assert_one_line_error, run_cli
from tf_bnfuse.graph import tf_internal

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINEAR = {"CONV_2D", "CONV_3D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{flavour: a small model's path}, each built when a test first asks for it."""
    root = tmp_path_factory.mktemp("quantize")

    class Built(dict):
        def __missing__(self, flavour):
            if flavour == "keras3":
                self[flavour] = model_zoo.build(keras, "dilated_conv_bn", str(root))[0]
            else:
                subprocess.run([sys.executable, os.path.join(HERE, "model_zoo.py"), "tf_keras", str(root / "tf_keras"),
                                "pool_bn_conv"], check=True, env=dict(os.environ, TF_USE_LEGACY_KERAS="1"), timeout=600,
                               capture_output=True)
                self[flavour] = str(root / "tf_keras" / "pool_bn_conv")
            return self[flavour]
    return Built()


def write_samples(src, path, count, seed, shape_change=0):
    """A .npz of `count` samples per input of serving_default, named INPUT; returns the arrays."""
    function = tf.saved_model.load(src).signatures["serving_default"]
    rng = np.random.default_rng(seed)
    arrays = {k: rng.standard_normal([count] + s.shape.as_list()[1:-1] + [s.shape[-1] + shape_change]).astype(
        np.float32) for k, s in function.structured_input_signature[1].items()}
    np.savez(path, **arrays)
    return arrays


def tflite_outputs(model_path, inputs, key="serving_default"):
    """The .tflite model's outputs, its int8 inputs quantized and int8 outputs dequantized here."""
    interpreter = Interpreter(model_path=model_path)
    runner = interpreter.get_signature_runner(key)
    fed = {}
    for name, value in inputs.items():
        detail = runner.get_input_details()[name]
        scale, zero_point = detail["quantization"]
        fed[name] = (np.clip(np.rint(value / scale) + zero_point, -128, 127).astype(np.int8)
                     if detail["dtype"] == np.int8 else value)
    outputs = runner(**fed)
    result = {}
    for name, value in outputs.items():
        scale, zero_point = runner.get_output_details()[name]["quantization"]
        result[name] = (value.astype(np.float64) - zero_point) * scale if value.dtype == np.int8 else value
    return result, runner


def linear_weight_dtypes(model_path):
    interpreter = Interpreter(model_path=model_path)
    dtypes = {t["index"]: t["dtype"] for t in interpreter.get_tensor_details()}
    ops = interpreter._get_ops_details()
    return [dtypes[op["inputs"][1]] for op in ops if op["op_name"] in LINEAR], [op["op_name"] for op in ops]


@pytest.mark.parametrize("flavour,io", [("keras3", "float"), ("tf_keras", "int8")])
def test_int8_is_full_integer_folded_and_its_reported_error_checks_out(models, flavour, io, tmp_path):
    src = models[flavour]
    held_out = write_samples(src, tmp_path / "held_out.npz", 4, seed=1)
    write_samples(src, tmp_path / "calibration.npz", 8, seed=2)
    model_path, report_path = str(tmp_path / "m.tflite"), tmp_path / "r.json"
    result = run_cli("--saved_model_dir", src, "--output_dir", str(tmp_path / "out"), "--tflite_output", model_path,
                     "--tflite_quantize", "int8", "--tflite_io", io, "--verify_inputs", str(tmp_path / "held_out.npz"),
                     "--calibration_inputs", str(tmp_path / "calibration.npz"), "--report_json", str(report_path))
    assert result.returncode == 0, result.stderr
    weights, ops = linear_weight_dtypes(model_path)
    assert weights and all(d == np.int8 for d in weights), (weights, ops)  # full-integer: int8 kernels
    assert "MUL" not in ops and "ADD" not in ops, ops  # the batch norm folded, no quantized MUL/ADD
    report = json.loads(report_path.read_text())["tflite"]
    assert report["batch_norm_ops"] == 0 and report["converter_alone_batch_norm_ops"] >= 1

    actual, runner = tflite_outputs(model_path, held_out)
    [in_dtype] = {d["dtype"] for d in runner.get_input_details().values()}
    [out_dtype] = {d["dtype"] for d in runner.get_output_details().values()}
    assert (in_dtype, out_dtype) == ((np.int8, np.int8) if io == "int8" else (np.float32, np.float32))
    expected = tf.saved_model.load(src).signatures["serving_default"](**held_out)
    quantization = report["quantization"]
    assert "--calibration_inputs" in quantization["calibration"] and "8 samples" in quantization["calibration"]
    reported = {(m["signature"], m["output"]): m for m in quantization["metrics"]}
    for name, value in expected.items():
        reference = value.numpy().astype(np.float64)
        error = np.linalg.norm(actual[name] - reference) / np.linalg.norm(reference)
        metric = reported["serving_default", name]
        assert metric["relative_l2_error"] == pytest.approx(error, rel=1e-4, abs=1e-7)
        assert 0 < error < 0.1  # quantized, so not exact; still close to the original
    assert {(m["signature"], m["output"]) for m in quantization["converter_alone_metrics"]} == set(reported)
    assert "converter alone" in result.stdout and "rel L2" in result.stdout


@pytest.mark.parametrize("mode", [pytest.param("float16", marks=pytest.mark.quick), "dynamic"])
def test_float16_and_dynamic_are_measured(models, mode, tmp_path):
    src, model_path = models["keras3"], str(tmp_path / "m.tflite")
    report_path = tmp_path / "r.json"
    result = run_cli("--saved_model_dir", src, "--output_dir", str(tmp_path / "out"), "--tflite_output", model_path,
                     "--tflite_quantize", mode, "--report_json", str(report_path))
    assert result.returncode == 0, result.stderr
    interpreter = Interpreter(model_path=model_path)
    if mode == "float16":  # the weights are stored as float16
        assert any(t["dtype"] == np.float16 for t in interpreter.get_tensor_details())
    _, ops = linear_weight_dtypes(model_path)
    assert "MUL" not in ops, ops
    quantization = json.loads(report_path.read_text())["tflite"]["quantization"]
    assert quantization["mode"] == mode and quantization["metrics"]
    assert all(0 <= m["relative_l2_error"] < 1e-2 for m in quantization["metrics"])


def test_bad_calibration_inputs_and_options_exit_2_with_one_line(models, tmp_path):
    src = models["keras3"]
    write_samples(src, tmp_path / "wrong.npz", 4, seed=1, shape_change=1)
    base = ["--saved_model_dir", src, "--output_dir", str(tmp_path / "out"), "--tflite_output", str(tmp_path / "m.tflite")]
    result = run_cli(*base, "--tflite_quantize", "int8", "--calibration_inputs", str(tmp_path / "wrong.npz"))
    assert_one_line_error(result, 2, "--calibration_inputs", "has shape")
    assert "freeze" not in result.stderr, result.stderr  # refused in the load phase, before any work
    assert_one_line_error(run_cli(*base, "--calibration_inputs", str(tmp_path / "wrong.npz")), 2, "int8")
    assert_one_line_error(run_cli(*base[:4], "--tflite_quantize", "int8"), 2, "--tflite_output")
    assert_one_line_error(run_cli(*base, "--tflite_quantize", "int4"), 2, "int4")
    assert not os.path.exists(tmp_path / "out") and not os.path.exists(tmp_path / "m.tflite")


def test_tflite_max_error_exceeded_exits_1_with_nothing_written(models, tmp_path):
    src, model_path = models["tf_keras"], str(tmp_path / "m.tflite")
    result = run_cli("--saved_model_dir", src, "--output_dir", str(tmp_path / "out"), "--tflite_output", model_path,
                     "--tflite_quantize", "int8", "--tflite_max_error", "1e-9")
    assert_one_line_error(result, 1, "--tflite_max_error", "relative L2 error")
    assert "not representative" in result.stderr  # calibrated on random inputs: said so
    assert not os.path.exists(tmp_path / "out") and not os.path.exists(model_path)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]


def test_int8_of_signatures_the_converter_writes_as_one(example_model, tmp_path):
    """The example's "embedding" signature returns one of serving_default's outputs: the converter
    writes serving_default alone, and calibration must follow its keys, not the SavedModel's."""
    model_path, report_path = str(tmp_path / "m.tflite"), tmp_path / "r.json"
    result = run_cli("--saved_model_dir", example_model, "--output_dir", str(tmp_path / "out"), "--tflite_output",
                     model_path, "--tflite_quantize", "int8", "--report_json", str(report_path))
    assert result.returncode == 0, result.stderr
    assert list(Interpreter(model_path=model_path).get_signature_list()) == ["serving_default"]
    weights, _ = linear_weight_dtypes(model_path)
    assert weights and all(d == np.int8 for d in weights)
    metrics = json.loads(report_path.read_text())["tflite"]["quantization"]["metrics"]
    assert {m["signature"] for m in metrics} == {"embedding", "serving_default"}
    assert all(0 < m["relative_l2_error"] < 0.2 for m in metrics)


@pytest.mark.filterwarnings("ignore:.*experimental_preserve_all_tensors:UserWarning")
def test_a_softmax_output_is_measured_on_its_logits_too(tmp_path):
    """int8 ties a softmax's nearly equal probabilities (top-1 agreement near 0 on them); the
    logits (the SOFTMAX's input in the .tflite, against log of the original's probabilities)
    keep the original's order: both rows, on both sides, and the summary says which to read.
    The logits the .tflite computes are checked against the Keras model's own logits layer."""
    import tf_bnfuse
    model, _ = model_zoo.build_model(keras, "softmax_100")
    rng = np.random.default_rng(8)
    calibration = rng.standard_normal((32, 12, 12, 3)).astype(np.float32)
    path = str(tmp_path / "m.tflite")
    report = tf_bnfuse.export(model, path, quantize="int8", calibration=calibration)
    quantization = report.tflite.quantization
    for metrics in (quantization.metrics, quantization.converter_alone_metrics):
        by_row = {(m.signature, m.logits_of): m for m in metrics}
        for key in ("serve", "serving_default"):
            probabilities, logits = by_row[(key, None)], by_row[(key, "output_0")]
            assert logits.top1_agreement == 1.0 and logits.top1_agreement > probabilities.top1_agreement
            assert logits.relative_l2_error < 0.05 < probabilities.relative_l2_error
    assert quantization.worst.logits_of is None  # --tflite_max_error judges outputs only
    assert "serve/output_0 logits" in str(report) and "read the logits row" in str(report)
    # Independently: the .tflite's SOFTMAX input orders classes as the Keras model's logits do.
    interpreter = Interpreter(model_path=path, experimental_preserve_all_tensors=True)
    runner = interpreter.get_signature_runner("serving_default")
    x = rng.standard_normal((16, 12, 12, 3)).astype(np.float32)
    [softmax] = [op for op in tf_internal.tflite_ops(interpreter) if op["op_name"] == "SOFTMAX"]
    [details] = [d for d in interpreter.get_tensor_details() if d["index"] == softmax["inputs"][0]]
    scale, zero_point = details["quantization"]
    [[name, spec]] = runner.get_input_details().items()
    in_scale, in_zero = spec["quantization"]

    tflite_logits = []
    for sample in x:
        fed = sample[None] if not in_scale else np.clip(np.round(sample[None] / in_scale + in_zero), -128, 127)
        runner(**{name: fed.astype(spec["dtype"])})
        tflite_logits.append((interpreter.get_tensor(details["index"]).astype(np.float64) - zero_point) * scale)
    keras_logits = keras.Model(model.inputs, model.get_layer("logits").output)([x]).numpy()
    agree = np.mean(np.argmax(np.concatenate(tflite_logits), -1) == np.argmax(keras_logits, -1))
    assert agree >= 0.9, agree
