"""fold_saved_model on tf-keras (Keras 2) models saved as SavedModels.

The models are built in one subprocess with TF_USE_LEGACY_KERAS=1 (see
model_zoo.py). The reference is the original SavedModel, run here.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

import conftest
from planted_errors import assert_caught_and_named
from savedmodel_checks import (batch_norm_like_left, compare_in_fresh_process, compare_outputs, data_path_ops,
                               signature_defs, xla_functions_with)
from tf_bnfuse import fold_saved_model

HERE = os.path.dirname(os.path.abspath(__file__))
SMALL = ["pool_bn_conv", "dense_rank3_bn", "conv_no_bias_bn", "dilated_conv_bn", "dilated_depthwise_bn", "depthwise_bn", "separable_bn", "conv_transpose_bn", "conv3d_bn",
         "channels_first_bn", "conv1d_bn", "dense_bn", "branch_bn", "preactivation_concat_bn", "mobilenet_v2_small",
         "residual_leaky_relu"]
RECURRENT = ["lstm_dense_bn", "gru_dense_bn"]
OTHER = ["grouped_conv_bn", "leaky_residual_then_bn"]
LARGE = ["resnet50"]  # real-sized weights (100 MB); MobileNetV2's architecture is mobilenet_v2_small's
WITHOUT_BIAS = {"conv_no_bias_bn", "mobilenet_v2_small"}  # their convs have use_bias=False


def _build(out, names):
    """{name: path} of tf-keras zoo models built in one subprocess (tf-keras and Keras 3 cannot share one)."""
    env = dict(os.environ, TF_USE_LEGACY_KERAS="1")
    subprocess.run([sys.executable, os.path.join(HERE, "model_zoo.py"), "tf_keras", str(out)] + names,
                   check=True, env=env, timeout=1200, capture_output=True)
    return {name: str(out / name) for name in names}


@pytest.fixture(scope="session")
def tf_keras_models(tmp_path_factory):
    return _build(tmp_path_factory.mktemp("tf_keras"), SMALL + RECURRENT + OTHER + LARGE)


@pytest.mark.quick
def test_a_small_tf_keras_model_folds_end_to_end(tmp_path):
    """The quick tier's tf-keras model, built alone: the whole zoo takes a minute to build."""
    _check_small_model(_build(tmp_path / "zoo", ["conv_bn"])["conv_bn"], "conv_bn", tmp_path)


@pytest.mark.parametrize("name", SMALL)
def test_small_tf_keras_model(tf_keras_models, name, tmp_path):
    _check_small_model(tf_keras_models[name], name, tmp_path)


def _check_small_model(src, name, tmp_path):
    out = str(tmp_path / "out")
    before = conftest.tree_digest(src)
    report = fold_saved_model(src, out)
    assert conftest.tree_digest(src) == before
    compare_outputs(src, out)
    # tf-keras' serving_default is its own graph, not a call of __call__. __call__'s
    # training=False trace computes what it computes, so it is kept (by value); its
    # training=True trace updates the moving statistics and is not, and the report says so.
    assert report.kept_functions == ["__call__"]
    assert "__call__(tensor, True, None): it writes variables" in report.dropped_functions["__call__"]
    assert "only Keras' own loader" in report.dropped_functions["call_and_return_all_conditional_losses"]
    graph = report.signatures["serving_default"]
    if name == "pool_bn_conv":  # the batch norm comes before the conv: a forward fold
        forward = next(p for p in graph.passes if p.pass_name == "fold_forward")
        assert len(forward.folds) == 1 and graph.skips == []
        assert "FusedBatchNormV3" not in data_path_ops(out)
        return
    if name == "residual_leaky_relu":  # the folded bias is an AddV2 there, on purpose (see misfused_by_remapper)
        assert len(graph.folds) == 1 and graph.skips == []
        assert not {"FusedBatchNormV3", "BiasAdd", "Rsqrt"} & set(data_path_ops(out))
        return
    if name in ("branch_bn", "preactivation_concat_bn"):
        assert graph.folds == [] and len(graph.skips) == 1
        assert ("2 consumers" if name == "branch_bn" else "not from a supported linear op") in graph.skips[0].reason
        # Not folded: the FusedBatchNormV3 stays one op (TFLite converts it), and nothing is added.
        assert graph.lowered == [] and data_path_ops(out).count("FusedBatchNormV3") == 1
        assert len(data_path_ops(out)) <= len(data_path_ops(src))
        return
    assert batch_norm_like_left(out) == [] and graph.skips == []
    assert len(graph.folds) >= 1
    if name.startswith("dilated"):  # the fold went through the BatchToSpaceND, which stays
        assert "BatchToSpaceND" in data_path_ops(out)
        assert not {"FusedBatchNormV3", "Mul", "AddV2", "Rsqrt"} & set(data_path_ops(out))
    # A batch norm becomes a BiasAdd; with a bias before it, two ops become one.
    ops_before, ops_after = len(data_path_ops(src)), len(data_path_ops(out))
    if name in WITHOUT_BIAS:
        assert ops_after <= ops_before
    else:
        assert ops_after <= ops_before - len(graph.folds)


@pytest.mark.parametrize("name,batch_norms", [("resnet50", 53), ("mobilenet_v2_small", 52)])
def test_tf_keras_applications_fold_completely(tf_keras_models, name, batch_norms, tmp_path):
    src, out = tf_keras_models[name], str(tmp_path / "out")
    before = conftest.tree_digest(src)
    report = fold_saved_model(src, out)
    assert conftest.tree_digest(src) == before
    graph = report.signatures["serving_default"]
    assert len(graph.folds) == batch_norms and graph.skips == []
    assert batch_norm_like_left(out) == []
    assert report.verification.ok
    compare_outputs(src, out)


@pytest.mark.parametrize("name", RECURRENT)
def test_tf_keras_recurrent_model_keeps_its_loop_and_folds_after_it(tf_keras_models, name, tmp_path):
    """tf-keras LSTM/GRU are While loops: they failed with 'inputs from different frames' when
    freezing lowered control flow. The output is judged in a fresh process, with its SignatureDefs."""
    src, out = tf_keras_models[name], str(tmp_path / "out")
    report = fold_saved_model(src, out)
    folds = report.signatures["serving_default"].folds  # inside the loop body: a cell's bias, if any
    assert [f.linear_op for f in folds if "while_body" not in f.node] == ["MatMul"]
    assert all(f.op in ("Add", "AddV2") for f in folds if "while_body" in f.node)
    assert signature_defs(out) == signature_defs(src)
    x = np.random.default_rng(6).standard_normal((2, 5, 3)).astype(np.float32)
    compare_in_fresh_process(src, out, {"serving_default": [{"image": x}]})
    assert "While" in data_path_ops(out) or "StatelessWhile" in data_path_ops(out)


def test_tf_keras_grouped_conv_folds_across_its_xla_call_and_stays_compiled(tf_keras_models, tmp_path):
    src, out = tf_keras_models["grouped_conv_bn"], str(tmp_path / "out")
    report = fold_saved_model(src, out)
    [fold] = report.signatures["serving_default"].folds
    assert fold.linear_op.startswith("Conv2D in ")
    x = np.random.default_rng(7).standard_normal((2, 8, 8, 8)).astype(np.float32)
    compare_in_fresh_process(src, out, {"serving_default": [{"image": x}]})
    assert xla_functions_with(out, "Conv2D")
    assert not {"FusedBatchNormV3", "Rsqrt"} & set(data_path_ops(out))


def _grappler_misfuses_leaky_relu():
    """Whether this TensorFlow, run with Grappler, computes conv + bias + residual add +
    LeakyRelu(0.1) otherwise than its ops say (oneDNN's fusion with alpha 0.2)."""
    import tensorflow as tf
    rng = np.random.default_rng(3)
    kernel, bias = rng.standard_normal((3, 3, 4, 4)).astype(np.float32), rng.standard_normal(4).astype(np.float32)
    x = tf.constant(rng.standard_normal((1, 8, 8, 4)).astype(np.float32))

    def block(x):
        return tf.nn.leaky_relu(tf.nn.bias_add(tf.nn.conv2d(x, kernel, 1, "SAME"), bias) + x, alpha=0.1)
    return not np.allclose(tf.function(block)(x).numpy(), block(x).numpy(), atol=1e-4)


def test_tf_keras_input_that_grappler_misfuses_is_held_to_its_graph_as_written(tf_keras_models, tmp_path):
    """The INPUT has TF's misfused chain: as TF runs it (Grappler, oneDNN), its LeakyRelu takes
    alpha 0.2. The folded model computes its graph as written (the remapper does not fuse its
    copy of the chain), so it matches only the input as written: the run passes, and says
    how far the output is from the input as TF runs it. Judged in a fresh process, against TF
    running the input with Grappler off."""
    if not _grappler_misfuses_leaky_relu():
        pytest.skip("this TensorFlow computes conv + bias + add + LeakyRelu(0.1) as written with Grappler "
                    "(no oneDNN misfusion here): nothing differs to fall back on")
    import tensorflow as tf
    from graphs import assert_same_outputs
    from savedmodel_checks import run_in_fresh_process
    from tf_bnfuse.report import format_run
    src, out = tf_keras_models["leaky_residual_then_bn"], str(tmp_path / "out")
    report = fold_saved_model(src, out, tflite_output=str(tmp_path / "model.tflite"))
    assert report.verification.ok and report.tflite.ok
    assert len(report.signatures["serving_default"].folds) == 1
    differs = report.verification.grappler_differs
    assert differs and all(k.startswith("serving_default on ") for k in differs), differs
    assert min(differs.values()) > 0.01  # alpha 0.2 instead of 0.1 on the negative half
    assert "Grappler computes the INPUT otherwise than its graph says" in format_run(report)
    assert "__call__" in report.kept_functions  # root_functions.check falls back the same way

    x = np.random.default_rng(9).standard_normal((2, 8, 8, 4)).astype(np.float32)
    folded, input_as_run = run_in_fresh_process([(out, None, "serving_default", {"image": x}),
                                                 (src, None, "serving_default", {"image": x})])
    tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": True})
    try:
        input_as_written = {k: v.numpy() for k, v in
                            tf.saved_model.load(src).signatures["serving_default"](image=tf.constant(x)).items()}
    finally:
        tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": False})
    assert_same_outputs(input_as_written, folded)
    (key,) = folded
    assert np.abs(folded[key] - input_as_run[key]).max() > 0.01


def test_tf_keras_model_called_directly_runs_the_folded_graph(tf_keras_models, tmp_path):
    """`tf.saved_model.load(path)(x)` works on the output as on the input (training=False by
    default), judged in a fresh process, and runs the folded graph."""
    import tensorflow as tf
    src, out = tf_keras_models["conv_no_bias_bn"], str(tmp_path / "out")
    report = fold_saved_model(src, out)
    assert "__call__" in report.kept_functions
    (name, spec), = tf.saved_model.load(src).signatures["serving_default"].structured_input_signature[1].items()
    feeds = {name: np.random.default_rng(8).standard_normal([2] + spec.shape.as_list()[1:]).astype(np.float32)}
    outputs = compare_in_fresh_process(src, out, {"serving_default": [feeds], "root.__call__": [feeds]})
    (signature_output,) = outputs["serving_default"][0].values()
    np.testing.assert_array_equal(outputs["root.__call__"][0]["0"], signature_output)
    loaded = tf.saved_model.load(out)
    graph_def = loaded.__call__.get_concrete_function(tf.TensorSpec(spec.shape, tf.float32), False, None).graph.as_graph_def()
    ops = {n.op for n in graph_def.node} | {n.op for f in graph_def.library.function for n in f.node_def}
    assert "Conv2D" in ops and not ops & {"FusedBatchNormV3", "Rsqrt"}


def test_a_planted_error_in_a_tf_keras_mobilenet_v2_is_caught_and_named(tf_keras_models, tmp_path, monkeypatch):
    checks = assert_caught_and_named(tf_keras_models["mobilenet_v2_small"], ["block_3_expand", "block_12_depthwise"],
                                     ["Conv_1"], str(tmp_path / "out"), monkeypatch)
    assert len(checks.checks) == 52
