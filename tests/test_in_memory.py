"""tf_bnfuse.fold and tf_bnfuse.export: live objects folded in memory (issue 27).

Each folded object is judged against the live input it came from, and every file written from it
(tf.saved_model.save, TFLiteConverter.from_concrete_functions, export) is loaded and called in a
fresh process (savedmodel_checks.run_in_fresh_process, which runs .tflite files on LiteRT).
"""

import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import tf_bnfuse
from tf_bnfuse import errors
from tf_bnfuse.passes.left_alone import TRAINING_MODE
from tf_bnfuse.phases import output as output_phase

import live_models
import model_zoo
from savedmodel_checks import run_in_fresh_process

HERE = os.path.dirname(os.path.abspath(__file__))
RTOL = 1e-4  # of the output's scale, the CLI's float32 bound
TFLITE_RTOL = 1e-3


def _close(actual, expected, rtol=RTOL):
    scale = max(float(np.max(np.abs(expected))), 1e-6)
    return float(np.max(np.abs(np.asarray(actual, np.float64) - expected))) <= rtol * scale


def _judge_written(facts, keys):
    """The SavedModel's every signature and the .tflite, called in a fresh process on facts' inputs."""
    inputs = {facts["input_name"]: facts["x"]}
    calls = [(facts["saved_model"], None, key, inputs) for key in keys] + [(facts["tflite"], None, "serving_default",
                                                                             inputs)]
    results = run_in_fresh_process(calls)
    for key, outputs in zip(keys + ["tflite"], results):
        [value] = outputs.values()
        assert _close(value, facts["expected"], TFLITE_RTOL if key == "tflite" else RTOL), key


def _check_facts(facts, keys):
    assert facts["folds"] == facts["batch_norms"] and facts["verified"]
    assert facts["signatures"] == keys
    assert _close(facts["in_memory"], facts["expected"])
    assert facts["weights_unchanged"], "fold changed the input model's weights"
    assert facts["trained"], "the input model did not train after the fold"
    # The folded object owns its weights: the input's training step does not reach it.
    np.testing.assert_array_equal(facts["after_training"], facts["in_memory"])
    _judge_written(facts, keys)


@pytest.mark.parametrize("name", ["conv_bn", "residual_leaky_relu", "sequential_conv_dense_bn", "subclassed_conv_bn"])
def test_keras3_model_folds_in_memory_and_saves_and_converts(name, tmp_path):
    """Functional models (one with a residual branch), a keras.Sequential, a subclassed model."""
    import keras
    _check_facts(live_models.fold_and_write(keras, name, str(tmp_path)), ["serve", "serving_default"])


def test_tf_saved_model_save_without_signatures_writes_the_serving_default(tmp_path):
    import keras
    model, _ = model_zoo.build_model(keras, "sequential_conv_dense_bn")
    folded = tf_bnfuse.fold(model)
    x = np.random.default_rng(5).standard_normal((2, 6, 6, 2)).astype(np.float32)
    path = str(tmp_path / "sm")
    tf.saved_model.save(folded, path)  # no signatures=: the folded object names its serving_default
    [outputs] = run_in_fresh_process([(path, None, "serving_default", {"image": x})])
    assert _close(outputs["output_0"], np.asarray(model(x)))


@pytest.mark.parametrize("name", ["conv_bn", "subclassed_conv_bn"])
def test_tf_keras_model_folds_in_memory_and_saves_and_converts(name, tmp_path):
    env = dict(os.environ, TF_USE_LEGACY_KERAS="1")
    result = subprocess.run([sys.executable, os.path.join(HERE, "live_models.py"), "tf_keras", name, str(tmp_path)],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / "facts.pkl", "rb") as f:
        facts = pickle.load(f)
    _check_facts(facts, ["serving_default"])


STATEFUL = "bn_training,stateful_counter,dropout_training"


def _check_three_ways(by_name):
    """Each model folded live, from its loaded SavedModel and by the CLI: the same folds, the same
    batch norms left alone for the same reasons, verified; the training-mode one named as such."""
    for name, ways in by_name.items():
        assert ways["live"] == ways["loaded"] == ways["cli"], (name, ways)
        by_key, verified = ways["live"]
        assert verified, name
        for folds, left_alone in (v for v in by_key.values() if not isinstance(v, str)):
            assert folds == 1, (name, folds)
            if name == "bn_training":
                assert list(left_alone.values()) == [TRAINING_MODE], left_alone


def test_keras3_models_with_state_fold_live_as_their_saved_models_do(tmp_path):
    """A training-mode batch norm, a layer that assigns a variable, a Dropout with training=True
    (its seed generator's state, which Keras 3's object graph does not reach)."""
    import keras
    _check_three_ways(live_models.three_ways(keras, STATEFUL, str(tmp_path)))


def test_tf_keras_models_with_state_fold_live_as_their_saved_models_do(tmp_path):
    env = dict(os.environ, TF_USE_LEGACY_KERAS="1")
    result = subprocess.run([sys.executable, os.path.join(HERE, "live_models.py"), "tf_keras", STATEFUL,
                             str(tmp_path), "three_ways"], env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / "facts.pkl", "rb") as f:
        _check_three_ways(pickle.load(f))


@pytest.mark.parametrize("name", ["two_inputs_same_shape", "three_inputs"])
def test_a_folded_keras3_model_is_called_like_the_model_by_position_list_or_name(name):
    """Inputs in the model's order, not sorted by name: "second" before "first", of one shape."""
    import keras
    errors_by_call = live_models.positional_calls(keras, name)
    assert set(errors_by_call) == {"positional", "list", "dict"}
    assert all(error < 1e-4 for error in errors_by_call.values()), errors_by_call


@pytest.mark.parametrize("name", ["two_inputs_same_shape"])
def test_a_folded_tf_keras_model_is_called_like_the_model_by_position_list_or_name(name, tmp_path):
    env = dict(os.environ, TF_USE_LEGACY_KERAS="1")
    result = subprocess.run([sys.executable, os.path.join(HERE, "live_models.py"), "tf_keras", name, str(tmp_path),
                             "positional_calls"], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / "facts.pkl", "rb") as f:
        errors_by_call = pickle.load(f)
    assert set(errors_by_call) == {"positional", "list", "dict"}
    assert all(error < 1e-4 for error in errors_by_call.values()), errors_by_call


def test_a_folded_saved_model_of_several_inputs_is_called_by_name_only(tmp_path):
    """A loaded SavedModel's signature takes its inputs by name: positional arguments, which
    it has no order for, are refused rather than matched by sorted name."""
    import keras
    model, _ = model_zoo.build_model(keras, "two_inputs_same_shape")
    path = str(tmp_path / "sm")
    model.export(path, verbose=False)
    folded = tf_bnfuse.fold(tf.saved_model.load(path))
    p, q = (np.random.default_rng(k).standard_normal((2, 8, 8, 2)).astype(np.float32) for k in (1, 2))
    with pytest.raises(TypeError, match="by name"):
        folded(p, q)
    output = folded({"second": p, "first": q})  # one tensor, as the model returns one
    assert _close(np.asarray(output), np.asarray(model([p, q])))


def test_fold_leaves_the_callers_collector_and_optimizer_settings_as_it_found_them():
    """A caller's gc.freeze() (a pre-fork server's) is still in effect after fold, nothing of the
    run's stays frozen where the caller froze nothing, and TensorFlow's optimizer options (which
    the checks as written switch) are as they were."""
    import gc
    import keras
    model, _ = model_zoo.build_model(keras, "conv_bn")
    options = tf.config.optimizer.get_experimental_options()
    assert gc.get_freeze_count() == 0
    tf_bnfuse.fold(model)
    assert gc.get_freeze_count() == 0
    callers = [[k] for k in range(1000)]  # objects of the caller's, alive throughout
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        tf_bnfuse.fold(model)
        # Still frozen: outside the collector's generations (objects the caller froze that
        # TensorFlow let go of meanwhile leave the count, so it may only fall a little).
        collected = {id(o) for o in gc.get_objects()}
        assert not any(id(o) in collected for o in callers)
        assert frozen - 100 <= gc.get_freeze_count() <= frozen
    finally:
        gc.unfreeze()
    assert tf.config.optimizer.get_experimental_options() == options


class TwoSignatures(tf.Module):
    """A tf.Module with two input-signature tf.functions over conv -> batch norm weights."""

    def __init__(self, seed=0):
        rng = np.random.default_rng(seed)
        self.kernel = tf.Variable(rng.standard_normal((3, 3, 2, 4)).astype(np.float32) * 0.3)
        self.dense = tf.Variable(rng.standard_normal((4, 3)).astype(np.float32) * 0.3)
        self.gamma = tf.Variable(rng.uniform(.5, 1.5, 4).astype(np.float32))
        self.beta = tf.Variable(rng.normal(0, .5, 4).astype(np.float32))
        self.mean = tf.Variable(rng.normal(0, .5, 4).astype(np.float32))
        self.var = tf.Variable(rng.uniform(.5, 1.5, 4).astype(np.float32))

    def _features(self, x):
        y = tf.nn.conv2d(x, self.kernel, 1, "SAME")
        y, _, _ = tf.compat.v1.nn.fused_batch_norm(y, self.gamma, self.beta, self.mean, self.var, 1e-3,
                                                   is_training=False)
        return tf.nn.relu(y)

    @tf.function(input_signature=[tf.TensorSpec([None, 6, 6, 2], tf.float32, name="image")])
    def features(self, image):
        return {"features": self._features(image)}

    @tf.function(input_signature=[tf.TensorSpec([None, 6, 6, 2], tf.float32, name="image")])
    def scores(self, image):
        return tf.matmul(tf.reduce_mean(self._features(image), [1, 2]), self.dense)


def test_a_tf_module_with_two_signatures_folds_in_memory(tmp_path):
    module = TwoSignatures()
    before = [v.numpy() for v in module.variables]
    folded = tf_bnfuse.fold(module)
    assert sorted(folded.signatures) == ["features", "scores"]
    assert all(len(folded.report.signatures[k].folds) == 1 for k in ("features", "scores"))
    x = np.random.default_rng(1).standard_normal((2, 6, 6, 2)).astype(np.float32)
    expected = {"features": module.features(x)["features"].numpy(), "scores": module.scores(x).numpy()}
    # Callable like the input: its tf.functions are kept under their names
    assert _close(folded.features(x)["features"], expected["features"])
    assert _close(folded.scores(x), expected["scores"])
    assert all(np.array_equal(b, v.numpy()) for b, v in zip(before, module.variables))
    with tf.GradientTape() as tape:  # the input can still train
        loss = tf.reduce_sum(module.scores(x) ** 2)
    gradients = tape.gradient(loss, module.trainable_variables)
    for g, v in zip(gradients, module.trainable_variables):
        if g is not None:  # the moving statistics have none
            v.assign_sub(0.1 * g)
    assert not np.array_equal(module.kernel.numpy(), before[next(i for i, v in enumerate(module.variables) if v is module.kernel)])
    assert _close(folded.scores(x), expected["scores"])  # its own weights
    path, tflite = str(tmp_path / "sm"), str(tmp_path / "m.tflite")
    tf.saved_model.save(folded, path, signatures=folded.signatures)
    with open(tflite, "wb") as f:
        f.write(tf.lite.TFLiteConverter.from_concrete_functions(list(folded.signatures.values()), folded).convert())
    results = run_in_fresh_process([(path, None, "features", {"image": x}), (path, None, "scores", {"image": x}),
                                    (path, None, "root.scores", {"image": x}),
                                    (tflite, None, "features", {"image": x}), (tflite, None, "scores", {"image": x})])
    assert _close(results[0]["features"], expected["features"])
    assert _close(results[1]["output_0"], expected["scores"])
    assert _close(results[2]["0"], expected["scores"])
    assert _close(results[3]["features"], expected["features"], TFLITE_RTOL)
    assert _close(results[4]["output_0"], expected["scores"], TFLITE_RTOL)


def test_a_bare_concrete_function_folds_in_memory(tmp_path):
    module = TwoSignatures(seed=2)
    function = module.features.get_concrete_function()
    kernel_before = module.kernel.numpy()
    x = np.random.default_rng(3).standard_normal((2, 6, 6, 2)).astype(np.float32)
    folded = tf_bnfuse.fold(function, verify_inputs={"image": x})
    assert list(folded.signatures) == ["serving_default"]
    assert len(folded.report.signatures["serving_default"].folds) == 1
    np.testing.assert_array_equal(folded.in_memory_run.folded.test_inputs.arrays["serving_default"]["image"], x)
    expected = module.features(x)["features"].numpy()
    assert _close(folded(image=x)["features"], expected)
    np.testing.assert_array_equal(module.kernel.numpy(), kernel_before)
    path = str(tmp_path / "sm")
    tf.saved_model.save(folded, path, signatures=folded.signatures)
    [result] = run_in_fresh_process([(path, None, "serving_default", {"image": x})])
    assert _close(result["features"], expected)


def test_one_engine_fold_of_a_loaded_saved_model_computes_what_the_cli_output_computes(tmp_path):
    import keras
    src, _ = model_zoo.build(keras, "conv_bn_swish", str(tmp_path))
    cli_out, api_out = str(tmp_path / "cli"), str(tmp_path / "api")
    subprocess.run([sys.executable, "-m", "tf_bnfuse", "--saved_model_dir", src, "--output_dir", cli_out],
                   check=True, capture_output=True, timeout=600)
    folded = tf_bnfuse.fold(tf.saved_model.load(src))
    tf.saved_model.save(folded, api_out, signatures=folded.signatures)
    x = np.random.default_rng(0).standard_normal((2, 12, 12, 3)).astype(np.float32)
    calls = [(p, None, k, {"image": x}) for p in (src, cli_out, api_out) for k in ("serve", "serving_default")]
    results = run_in_fresh_process(calls)
    original, cli, api = results[0:2], results[2:4], results[4:6]
    for o, c, a in zip(original, cli, api):
        np.testing.assert_allclose(a["output_0"], c["output_0"], rtol=1e-6, atol=1e-6)
        assert _close(a["output_0"], o["output_0"])
    assert len(folded.report.signatures["serve"].folds) == 1


def test_export_litert_int8_writes_a_full_integer_model_without_the_batch_norm_ops_the_converter_leaves(tmp_path):
    """MaxPooling2D -> BatchNormalization -> Conv2D: the converter alone leaves the batch norm's
    MUL and ADD (docs/tflite.md); the export folds it forward into the conv."""
    import keras
    model, _ = model_zoo.build_model(keras, "pool_bn_conv")
    path = str(tmp_path / "model.tflite")
    images = np.random.default_rng(8).standard_normal((8,) + tuple(model.inputs[0].shape[1:])).astype(np.float32)
    report = tf_bnfuse.export(model, path, format="litert", quantize="int8", io="int8", calibration=images,
                              verbose=False)
    assert report.tflite.quantization.calibration == "the calibration arrays given (serve 8 samples)"
    assert report.tflite.batch_norm_ops == 0 and report.tflite.converter_alone_batch_norm_ops > 0
    [ops] = run_in_fresh_process([(path, None, "ops", {})])
    assert "MUL" not in ops["ops"] and "ADD" not in ops["ops"], ops["ops"]
    assert "DEQUANTIZE" not in ops["ops"] and "QUANTIZE" not in ops["ops"], ops["ops"]
    assert list(ops["inputs"]) == ["int8"] and list(ops["outputs"]) == ["int8"]


@pytest.mark.quick
@pytest.mark.parametrize("options, message", [
    (dict(format="onnx"), "format='onnx'"),
    (dict(quantize="int8"), "for format=\"litert\""),
    (dict(format="litert", quantize="int4"), "quantize='int4'"),
    (dict(format="litert", io="int8"), "for quantize=\"int8\""),
    (dict(format="litert", quantize="float16", max_error=0), "max_error=0"),
    (dict(format="litert", quantize="int8", calibration="missing.npz"), "calibration missing.npz does not exist"),
    (dict(format="tf_saved_model", path="model.tflite"), "ends in .tflite"),
])
def test_export_rejects_a_wrong_option_before_any_work(options, message, tmp_path, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("work started before the options were checked")
    monkeypatch.setattr("tf_bnfuse.api._fold_object", no_work)
    path = str(tmp_path / options.pop("path", "out"))
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        tf_bnfuse.export(TwoSignatures(), path, **options)
    assert not os.listdir(tmp_path)


def test_export_speaks_in_its_own_parameters_and_checks_calibration_before_folding(tmp_path):
    """A calibration array named for no input is refused by the load phase, before anything is
    frozen, in export's terms (calibration, not --calibration_inputs)."""
    import keras
    model, _ = model_zoo.build_model(keras, "conv_bn")
    wrong = {"not_an_input": np.zeros((4, 8, 8, 3), np.float32)}
    with pytest.raises(errors.BadInputError) as raised:
        tf_bnfuse.export(model, str(tmp_path / "model.tflite"), quantize="int8", calibration=wrong)
    assert str(raised.value).startswith("calibration (arrays): not_an_input names no signature input")
    assert not [p for p in raised.value.run_report.phases if p["name"].startswith("freeze")]
    assert not os.listdir(tmp_path)


def test_export_of_a_folded_model_refuses_folds_options_and_takes_the_format_from_the_suffix(tmp_path):
    module = TwoSignatures(seed=3)
    folded = tf_bnfuse.fold(module)
    with pytest.raises(ValueError, match="^config, verify: fold's options"):
        tf_bnfuse.export(folded, str(tmp_path / "out"), config={"verify": {}}, verify=False)
    report = tf_bnfuse.export(folded, str(tmp_path / "model.tflite"))  # no format: litert by the suffix
    assert os.path.isfile(tmp_path / "model.tflite") and report.tflite is not None and report.tflite.ok


@pytest.mark.quick
def test_fold_and_export_print_nothing_unless_asked_and_leave_the_logger_as_found(tmp_path, capfd, caplog):
    """Quiet by default (TensorFlow's converter may still write its own C++ lines); verbose=True
    shows each phase and each step of the TFLite phase as it starts, then the summary; the
    tf_bnfuse logger at INFO (the caller's logging) gets the same lines without verbose."""
    import logging
    import keras
    model, _ = model_zoo.build_model(keras, "conv_bn")
    logger = logging.getLogger("tf_bnfuse")
    state = (logger.level, list(logger.handlers), logger.propagate)
    folded = tf_bnfuse.fold(model)
    tf_bnfuse.export(folded, str(tmp_path / "quiet.tflite"), format="litert")
    out, err = capfd.readouterr()
    assert out == "" and "tf_bnfuse" not in err, (out, err)

    report = tf_bnfuse.export(model, str(tmp_path / "verbose.tflite"), format="litert", verbose=True)
    out, err = capfd.readouterr()
    assert out.strip() == str(report).strip() and "folded" in out
    steps = [line.split("] ", 1)[1].strip() for line in err.splitlines() if line.startswith("tf_bnfuse [")]
    assert steps.index("verify ...") < steps.index("tflite ...")
    tflite = steps[steps.index("tflite ..."):]
    assert [s.split(" ")[0] for s in tflite[1:4]] == ["converting", "converting", "checking"], steps
    assert state == (logger.level, list(logger.handlers), logger.propagate)

    with caplog.at_level(logging.INFO, logger="tf_bnfuse"):
        tf_bnfuse.fold(model)
    assert "verify ..." in [r.getMessage() for r in caplog.records]


@pytest.mark.quick
def test_fold_leaves_the_root_logger_as_found_and_verbose_says_each_line_once(monkeypatch, capfd):
    """TensorFlow's signature code logs through absl, which calls logging.basicConfig() where the
    root logger has no handler: the caller's root logger must come back without one. Where the
    caller's root logger has a handler (basicConfig(): WARNING), verbose progress lines go to
    stderr once, not to that handler as well."""
    import io
    import logging
    import keras
    model, _ = model_zoo.build_model(keras, "conv_bn")
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])  # in a test, pytest's capture handlers are there
    configured, basic_config = [], logging.basicConfig
    monkeypatch.setattr(logging, "basicConfig", lambda *a, **k: configured.append(1) or basic_config(*a, **k))
    tf_bnfuse.fold(model)
    assert configured, "nothing in fold logged through absl: this test would test nothing"
    assert root.handlers == []

    callers = io.StringIO()
    monkeypatch.setattr(root, "handlers", [logging.StreamHandler(callers)])
    tf_bnfuse.fold(model, verbose=True)
    err = capfd.readouterr().err
    assert [line.split("] ", 1)[1] for line in err.splitlines() if line.endswith("] verify ...")] == ["verify ..."]
    assert "verify ..." not in callers.getvalue()


def test_fold_names_what_it_cannot_fold():
    with pytest.raises(errors.BadInputError, match="no tf.function with an input_signature"):
        tf_bnfuse.fold(tf.Module())
    with pytest.raises(ValueError, match="cannot fold a builtins.int"):
        tf_bnfuse.fold(3)
    with pytest.raises(ValueError, match=r"not a path: .* call tf_bnfuse.fold_saved_model\('/models/net', output_dir\)"):
        tf_bnfuse.fold("/models/net")


def test_export_of_a_folded_object_writes_a_verified_saved_model_and_does_not_fold_again(tmp_path, monkeypatch):
    module = TwoSignatures(seed=4)
    folded = tf_bnfuse.fold(module)
    monkeypatch.setattr("tf_bnfuse.api._fold_object", lambda *a, **k: pytest.fail("folded again"))
    verified = []
    real_verify = output_phase.verify
    monkeypatch.setattr(output_phase, "verify", lambda *a, **k: verified.append(a[0]) or real_verify(*a, **k))
    path = str(tmp_path / "out")
    report = tf_bnfuse.export(folded, path, verbose=False)
    assert verified and report.verification.ok and report.output_dir == path
    x = np.random.default_rng(6).standard_normal((1, 6, 6, 2)).astype(np.float32)
    [features, scores] = run_in_fresh_process([(path, None, "features", {"image": x}),
                                               (path, None, "scores", {"image": x})])
    assert _close(features["features"], module.features(x)["features"].numpy())
    assert _close(scores["output_0"], module.scores(x).numpy())


def test_a_list_of_concrete_functions_folds_each_under_its_function_name():
    module = TwoSignatures(seed=5)
    folded = tf_bnfuse.fold([module.features.get_concrete_function(), module.scores.get_concrete_function()])
    assert sorted(folded.signatures) == ["features", "scores"]
    x = np.random.default_rng(9).standard_normal((1, 6, 6, 2)).astype(np.float32)
    assert _close(folded.signatures["scores"](image=tf.constant(x))["output_0"], module.scores(x).numpy())
    with pytest.raises(TypeError, match="no serving_default"):
        folded(x)


def test_a_loaded_saved_model_without_signatures_folds_its_restored_functions(tmp_path):
    """tf.saved_model.save(module, path, signatures={}) keeps the tf.functions, not as signatures:
    fold takes the restored ones, whose inlined bodies wait on their first argument (a control
    edge from the fed input placeholder, which the folded function must drop)."""
    module = TwoSignatures(seed=6)
    tf.saved_model.save(module, str(tmp_path / "in"), signatures={})
    loaded = tf.saved_model.load(str(tmp_path / "in"))
    folded = tf_bnfuse.fold(loaded)
    assert sorted(folded.signatures) == ["features", "scores"]
    assert [len(folded.report.signatures[k].folds) for k in ("features", "scores")] == [1, 1]
    x = np.random.default_rng(10).standard_normal((2, 6, 6, 2)).astype(np.float32)
    path = str(tmp_path / "out")
    tf.saved_model.save(folded, path, signatures=folded.signatures)
    [features] = run_in_fresh_process([(path, None, "features", {"image": x})])
    assert _close(features["features"], module.features(x)["features"].numpy())
