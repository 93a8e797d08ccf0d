"""A fold check holds one original kernel at a time (issue 36): the passes release each original
kernel as its fold is emitted, and the check reads it back from the input's own checkpoint, a
batch of folds at a time (verify.fold_check_batch_bytes); a TF1 model's from where its saver
restored it. Judged by the weight store's own byte count, not RSS, so that the test does not
depend on the machine."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from cli_checks import assert_one_line_error, run_cli
from planted_errors import kernel_scaled
from savedmodel_checks import compare_in_fresh_process
from tf_bnfuse import config as config_lib
from tf_bnfuse import errors
from tf_bnfuse import fold_saved_model

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                "benchmarks"))
import big_models  # noqa: E402  (benchmarks/ is not a package)

C = 128  # a 3x3 C -> C float32 kernel is 576 KB; the batch norms' vectors are not stored
KERNEL_BYTES = 9 * C * C * 4
LAYERS = big_models.LAYERS


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """The big-model benchmark's model (benchmarks/big_models.py), small: LAYERS 3x3 convs of C
    channels, each followed by a FusedBatchNormV3 with random statistics, saved by
    tf.saved_model.save in a fresh process."""
    path = str(tmp_path_factory.mktemp("stack") / "saved_model")
    subprocess.run([sys.executable, "-c", big_models.BUILD, path, str(C), str(LAYERS)], check=True, timeout=300)
    return path


def _tf1_stack(path, main_op_scales=None, resource=True):
    """The same stack as a TF1 user saves it (Builder, a 1-batch input): resource variables, or
    reference variables (TF 1.x's default, which TensorFlow's freezing makes Consts); main_op_scales:
    a variable the main op multiplies by 1.5 after the saver restored it."""
    rng = np.random.default_rng(0)
    graph = tf.Graph()
    with graph.as_default():
        v1 = tf.compat.v1
        x = v1.placeholder(tf.float32, [1, 8, 8, C], name="x")
        y, variables = x, {}
        for i in range(LAYERS):
            kernel = (rng.standard_normal((3, 3, C, C)) / np.sqrt(9 * C)).astype(np.float32)
            variables["k%d" % i] = v1.get_variable("k%d" % i, initializer=kernel, use_resource=resource)
            gamma, beta, mean, variance = [tf.constant(v.astype(np.float32)) for v in (
                rng.uniform(0.5, 1.5, C), rng.normal(0, 0.5, C), rng.normal(0, 0.5, C), rng.uniform(0.2, 2.0, C))]
            y = tf.nn.relu(v1.nn.fused_batch_norm(tf.nn.conv2d(y, variables["k%d" % i], 1, "SAME"), gamma, beta,
                                                  mean, variance, epsilon=1e-3, is_training=False)[0])
        main_op = None
        if main_op_scales is not None:
            main_op = variables[main_op_scales].assign(variables[main_op_scales] * 1.5).op
        with v1.Session(graph=graph) as session:
            session.run(v1.global_variables_initializer())
            builder = v1.saved_model.Builder(path)
            builder.add_meta_graph_and_variables(
                session, ["serve"], {"serving_default": v1.saved_model.predict_signature_def({"x": x}, {"y": y})},
                main_op=main_op)
            builder.save()
    return path


def _config(tmp_path, batch_bytes):
    config = config_lib.load_config()
    config["verify"]["fold_check_batch_bytes"] = batch_bytes
    path = tmp_path / ("config_%d.json" % batch_bytes)
    path.write_text(json.dumps(config))
    return str(path)


def _assert_one_copy_of_each_kernel_and_one_in_flight(source, tmp_path):
    """Folds source with each fold checked alone: every fold checked, the store's peak one copy
    of each kernel and one more at most, the output the same as the input in a fresh process."""
    out = str(tmp_path / "out")
    report = fold_saved_model(source, out, config=_config(tmp_path, 1))
    folds = report.verification.folds
    assert folds.ok and len(folds.checks) == LAYERS and folds.not_checked == {}
    peak = report.signatures["serving_default"].weights_peak_bytes
    # Holding the original kernels until the checks ran would be 2 * LAYERS kernels.
    assert LAYERS * KERNEL_BYTES <= peak <= (LAYERS + 1) * KERNEL_BYTES, peak / KERNEL_BYTES
    x = np.random.default_rng(2).standard_normal((1, 8, 8, C)).astype(np.float32)
    compare_in_fresh_process(source, out, {"serving_default": [{"x": x}]})


def test_the_weight_store_holds_one_copy_of_each_kernel_and_one_in_flight(stack, tmp_path):
    _assert_one_copy_of_each_kernel_and_one_in_flight(stack, tmp_path)


@pytest.mark.parametrize("resource", [True, False], ids=["resource_variables", "reference_variables"])
def test_a_tf1_model_holds_one_copy_of_each_kernel_and_one_in_flight(tmp_path, resource):
    """A TF1 model's released kernels are read back from where its saver restored them."""
    _assert_one_copy_of_each_kernel_and_one_in_flight(_tf1_stack(str(tmp_path / "tf1"), resource=resource), tmp_path)


def test_a_tf1_model_whose_main_op_writes_a_restored_kernel_is_refused_up_front(tmp_path):
    """Its output would hold the kernel as written and write it again each time it loads (and the
    checkpoint's value is not the one the model computes with)."""
    source = _tf1_stack(str(tmp_path / "tf1"), main_op_scales="k2")
    out = tmp_path / "out"
    result = run_cli("--saved_model_dir", source, "--output_dir", str(out))
    assert_one_line_error(result, errors.EXIT_BAD_INPUT, source, "writes variable k2 after the saver restores it")
    assert "check folds" not in result.stderr and not out.exists()


@pytest.mark.parametrize("batch_bytes", [1, 1 << 27])
def test_a_planted_error_is_caught_and_named_whether_folds_are_checked_alone_or_together(
        stack, tmp_path, monkeypatch, batch_bytes):
    out = str(tmp_path / "out")
    with kernel_scaled(monkeypatch, "Conv2D_2", 1.001) as hit:
        with pytest.raises(errors.VerificationError, match="fails its own check") as raised:
            fold_saved_model(stack, out, config=_config(tmp_path, batch_bytes))
    folds = raised.value.run_report.verification.folds
    assert [c.linear_node for c in folds.failures()] == hit and len(hit) == 1
    assert len(folds.checks) == LAYERS and folds.not_checked == {}
