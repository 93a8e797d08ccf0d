"""--tflite_output: the folded model converts to TFLite with its batch norms gone, and matches.

The reference for every .tflite model is the original SavedModel, run here;
the op checks read the .tflite model's ops with TFLite's own interpreter.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from ai_edge_litert.interpreter import Interpreter  # the runtime users deploy .tflite models on

import graphs
import keras
import model_zoo
from tf_bnfuse import fold_saved_model
from savedmodel_checks import data_path_ops, save_graph_def

LINEAR = {"CONV_2D", "CONV_3D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV"}


def tflite_ops(path):
    interpreter = Interpreter(model_path=path)
    return [op["op_name"] for op in interpreter._get_ops_details()]


def assert_tflite_matches_original(tflite_path, saved_model, rtol=1e-3, seed=7):
    """Every signature of the .tflite model against the original SavedModel, on random inputs."""
    interpreter = Interpreter(model_path=tflite_path)
    original = tf.saved_model.load(saved_model)
    rng = np.random.default_rng(seed)
    for key in interpreter.get_signature_list():
        function = original.signatures[key]
        inputs = {k: rng.standard_normal([2 if d is None else d for d in s.shape.as_list()]).astype(np.float32)
                  for k, s in function.structured_input_signature[1].items()}
        expected = {k: v.numpy() for k, v in function(**inputs).items()}
        actual = interpreter.get_signature_runner(key)(**inputs)
        for name in expected:
            scale = np.abs(expected[name]).max()
            assert np.abs(actual[name] - expected[name]).max() <= rtol * scale + 1e-5, (key, name)


@pytest.mark.quick
def test_the_litert_runtime_is_used_where_installed_and_tensorflows_interpreter_otherwise(monkeypatch):
    from tf_bnfuse.verify import tflite
    name, interpreter = tflite.runtime()
    assert name.startswith("LiteRT") and interpreter is Interpreter
    monkeypatch.setitem(sys.modules, "ai_edge_litert", None)  # as if it were not installed
    name, interpreter = tflite.runtime()
    assert name.startswith("tf.lite.Interpreter") and interpreter is tf.lite.Interpreter


@pytest.fixture(scope="module")
def keras3_exported(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("keras3_tflite"))
    return lambda name: model_zoo.build(keras, name, root)[0]


@pytest.mark.parametrize("name,linear_op", [("dilated_conv_bn", "CONV_2D"), ("conv3d_no_bias_bn", "CONV_3D"),
                                            ("dilated_depthwise_bn", "DEPTHWISE_CONV_2D"),
                                            ("pool_bn_conv", "CONV_2D")])
def test_batch_norms_the_converter_keeps_are_gone_from_the_tflite_model(keras3_exported, name, linear_op,
                                                                        tmp_path):
    src = keras3_exported(name)
    tflite_path = str(tmp_path / "model.tflite")
    report = fold_saved_model(src, str(tmp_path / "out"), tflite_output=tflite_path)
    ops = tflite_ops(tflite_path)
    assert linear_op in ops and "MUL" not in ops, ops
    assert_tflite_matches_original(tflite_path, src)
    # The report says the same, and that converting the input directly kept the batch norm.
    assert report.tflite.ok and report.tflite.batch_norm_ops == 0
    assert report.tflite.converter_alone_ops is not None and report.tflite.converter_alone_ops.get("MUL", 0) >= 1
    if name != "pool_bn_conv":  # there the MUL comes before the conv, not after one
        assert report.tflite.converter_alone_batch_norm_ops >= 1


def test_fused_batch_norm_v2_graph_converts_only_after_folding(tmp_path):
    """The TFLite converter cannot convert FusedBatchNormV2; after folding there is none left."""
    def build():
        x = tf.compat.v1.placeholder(tf.float32, [None, 8, 8, 3], name="x")
        y = tf.nn.conv2d(x, graphs.const(graphs.random((3, 3, 3, 4)), "w"), 1, "SAME")
        y = graphs.fused_batch_norm(y, 4, "bn", version="V2")[0]
        return tf.identity(tf.nn.relu(y), name="out").op.name

    graph_def, output = graphs.build(build)
    src = str(tmp_path / "src")
    save_graph_def(graph_def, ["x"], [output], src)
    tflite_path = str(tmp_path / "model.tflite")
    report = fold_saved_model(src, str(tmp_path / "out"), tflite_output=tflite_path)
    assert report.tflite.converter_alone_ops is None and report.tflite.converter_alone_error
    ops = tflite_ops(tflite_path)
    assert "CONV_2D" in ops and "MUL" not in ops and "ADD" not in ops
    assert_tflite_matches_original(tflite_path, src)


def test_an_unfoldable_fused_batch_norm_v2_converts_as_one_fused_batch_norm_v3(tmp_path):
    """Conv2D -> Relu -> FusedBatchNormV2 cannot fold; the converter fails on the input's V2, and the
    output's one FusedBatchNormV3 (no more ops than the input) converts and computes the same."""
    def build():
        x = tf.compat.v1.placeholder(tf.float32, [None, 8, 8, 3], name="x")
        y = tf.nn.relu(tf.nn.conv2d(x, graphs.const(graphs.random((3, 3, 3, 4)), "w"), 1, "SAME"))
        return tf.identity(graphs.fused_batch_norm(y, 4, "bn", version="V2")[0], name="out").op.name

    graph_def, output = graphs.build(build)
    src, out = str(tmp_path / "src"), str(tmp_path / "out")
    save_graph_def(graph_def, ["x"], [output], src)
    tflite_path = str(tmp_path / "model.tflite")
    report = fold_saved_model(src, out, tflite_output=tflite_path)
    assert report.tflite.converter_alone_ops is None and "FusedBatchNormV2" in report.tflite.converter_alone_error
    assert [x.into for x in report.signatures["serving_default"].lowered] == ["FusedBatchNormV3"]
    assert [op for op in data_path_ops(out) if op.startswith("FusedBatchNorm")] == ["FusedBatchNormV3"]
    assert len(data_path_ops(out)) <= len(data_path_ops(src))
    assert_tflite_matches_original(tflite_path, src)


def test_matmul_reshape_batch_norm_leaves_only_fully_connected_and_reshapes(tmp_path):
    """MatMul -> Reshape to rank 4 -> FusedBatchNormV3 -> Reshape back, folded through the Reshape."""
    def build():
        x = tf.compat.v1.placeholder(tf.float32, [None, 16], name="x")
        y = tf.reshape(tf.matmul(x, graphs.const(graphs.random((16, 8)), "w")), [-1, 1, 1, 8])
        y = graphs.fused_batch_norm(y, 8, "bn")[0]
        return tf.reshape(y, [-1, 8], name="out").op.name

    graph_def, output = graphs.build(build)
    src = str(tmp_path / "src")
    save_graph_def(graph_def, ["x"], [output], src)
    tflite_path = str(tmp_path / "model.tflite")
    report = fold_saved_model(src, str(tmp_path / "out"), tflite_output=tflite_path)
    assert len(report.signatures["serving_default"].folds) == 1
    assert set(tflite_ops(tflite_path)) <= {"FULLY_CONNECTED", "RESHAPE"}
    assert_tflite_matches_original(tflite_path, src)


def test_cli_tflite_output_summary_and_bad_paths(example_model, tmp_path):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "tf_bnfuse", "--saved_model_dir", example_model, *args],
                              capture_output=True, text=True, timeout=600)

    tflite_path = tmp_path / "m.tflite"
    report_json = tmp_path / "r.json"
    result = cli("--output_dir", str(tmp_path / "out"), "--tflite_output", str(tflite_path),
                 "--report_json", str(report_json))
    assert result.returncode == 0, result.stderr
    assert "tflite %s" % tflite_path in result.stdout and "on the TFLite runtime" in result.stdout
    assert "run on LiteRT" in result.stdout  # ai-edge-litert is in the test extra
    written = json.loads(report_json.read_text())["tflite"]
    assert written["checks"] and written["runtime"].startswith("LiteRT")
    assert_tflite_matches_original(str(tflite_path), example_model)
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]

    # An existing .tflite is kept without --overwrite; a missing parent folder is refused; nothing written.
    before = tflite_path.read_bytes()
    refused = cli("--output_dir", str(tmp_path / "out2"), "--tflite_output", str(tflite_path))
    assert refused.returncode == 2 and "--overwrite" in refused.stderr
    assert tflite_path.read_bytes() == before and not (tmp_path / "out2").exists()
    missing = cli("--output_dir", str(tmp_path / "out3"), "--tflite_output", str(tmp_path / "no" / "m.tflite"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr and not (tmp_path / "out3").exists()


@pytest.mark.quick
def test_mixed_float16_model_converts_after_folding_with_float32_compute(keras3_exported, tmp_path):
    """The converter has no float16 conv: the TFLite path promotes the folded graph to float32."""
    src = keras3_exported("mixed_float16_conv_bn")
    tflite_path = str(tmp_path / "model.tflite")
    report = fold_saved_model(src, str(tmp_path / "out"), tflite_output=tflite_path)
    assert report.tflite.converter_alone_error and report.tflite.promoted_float16
    ops = tflite_ops(tflite_path)
    assert "CONV_2D" in ops and "MUL" not in ops and "ADD" not in ops, ops
    # The .tflite keeps the signature's float16 output; it matches the original within float16 precision.
    interpreter = Interpreter(model_path=tflite_path)
    function = tf.saved_model.load(src).signatures["serving_default"]
    [key] = function.structured_input_signature[1]
    image = np.random.default_rng(2).standard_normal((2, 12, 12, 3)).astype(np.float32)
    expected = {k: v.numpy() for k, v in function(**{key: image}).items()}
    actual = interpreter.get_signature_runner("serving_default")(**{key: image})
    for name in expected:
        assert actual[name].dtype == expected[name].dtype == np.float16
        e, a = expected[name].astype(np.float64), actual[name].astype(np.float64)
        assert np.abs(a - e).max() <= 1e-2 * np.abs(e).max()


@pytest.mark.quick
def test_the_tflite_check_takes_the_verifications_outputs_and_still_fails_a_wrong_model():
    """tflite.check with known outputs (the verification's, compare.Expected.seen): a matching
    model passes without calling the original again; a model 1% off fails, the original called
    once more as written before the check gives up."""
    from tf_bnfuse import config as config_lib
    from tf_bnfuse.verify import tflite
    rng = np.random.default_rng(5)
    weights = rng.standard_normal((16, 8)).astype(np.float32)

    def signature(w):
        module = tf.Module()
        module.w = tf.Variable(w)
        function = tf.function(lambda x: {"y": tf.matmul(x, module.w)},
                               input_signature=[tf.TensorSpec([None, 16], tf.float32, name="x")])
        return module, function.get_concrete_function()
    calls = []
    original_module, original = signature(weights)

    def counted(**inputs):
        calls.append(1)
        return original(**inputs)
    inputs = {"serving_default": {"x": rng.standard_normal((2, 16)).astype(np.float32)}}
    known = {"serving_default": {"y": original(x=tf.constant(inputs["serving_default"]["x"]))["y"].numpy()}}
    verify_config = config_lib.load_config(None)["verify"]
    for w, ok, original_calls in ((weights, True, 0), (weights * 1.01, False, 1)):
        module, function = signature(w)
        content = tflite.convert(tflite.functions_converter({"serving_default": function}, module))
        calls.clear()
        checks = tflite.check(content, {"serving_default": counted}, inputs, verify_config, known)
        assert [c.ok for c in checks] == [ok] and len(calls) == original_calls
