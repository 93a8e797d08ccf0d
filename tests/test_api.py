"""fold_saved_model end to end on SavedModels built from raw ops.

The reference is the original SavedModel, loaded and run independently here.
"""

import json
import os
import re
import threading

import numpy as np
import pytest
import tensorflow as tf

import conftest
import graphs
from tf_bnfuse import errors
from tf_bnfuse import fold_saved_model
from tf_bnfuse import passes

pytestmark = pytest.mark.quick  # the quick tier (scripts/test.sh --quick)


def saved_model_ops(path, key):
    graph_def = tf.saved_model.load(path).signatures[key].graph.as_graph_def()
    ops = [n.op for n in graph_def.node]
    for function in graph_def.library.function:
        ops += [n.op for n in function.node_def]
    return ops


def run_signature(path, key, inputs):
    loaded = tf.saved_model.load(path)
    return {k: v.numpy() for k, v in loaded.signatures[key](**inputs).items()}


def test_example_model_folds_keeps_signatures_and_matches(example_model, tmp_path):
    before = conftest.tree_digest(example_model)
    out = str(tmp_path / "out")
    report = fold_saved_model(example_model, out)

    assert conftest.tree_digest(example_model) == before, "input SavedModel was modified"
    original, folded = tf.saved_model.load(example_model), tf.saved_model.load(out)
    assert sorted(folded.signatures) == sorted(original.signatures) == ["embedding", "serving_default"]
    for key in original.signatures:
        o, f = original.signatures[key], folded.signatures[key]
        assert f.structured_input_signature == o.structured_input_signature
        assert {k: (v.dtype, v.shape.as_list()) for k, v in f.structured_outputs.items()} == \
               {k: (v.dtype, v.shape.as_list()) for k, v in o.structured_outputs.items()}
        image = graphs.random((3, 16, 16, 3))
        expected = {k: v.numpy() for k, v in o(image=image).items()}
        actual = {k: v.numpy() for k, v in f(image=image).items()}
        for name in expected:
            np.testing.assert_allclose(actual[name], expected[name], rtol=1e-4, atol=1e-5)

    # serving_default: three folds; the two-consumer batch norm (a FusedBatchNorm, V1) does not fold
    # and becomes the one form every runtime takes, a FusedBatchNormV3: still one op.
    serving = report.signatures["serving_default"]
    assert sorted(f.linear_op for f in serving.folds) == ["Conv2D", "Conv2DBackpropInput", "DepthwiseConv2dNative"]
    assert [s.op for s in serving.skips] == ["FusedBatchNorm"]
    assert [(x.node, x.into) for x in serving.lowered] == [(serving.skips[0].node, "FusedBatchNormV3")]
    assert [op for op in saved_model_ops(out, "serving_default") if op.startswith("FusedBatchNorm")] == [
        "FusedBatchNormV3"]
    assert not [op for op in saved_model_ops(out, "embedding") if op.startswith("FusedBatchNorm")]
    assert serving.nodes_after < serving.nodes_before

    # Verification ran every signature on both logical CPUs set up in conftest.
    assert report.verification.devices == ["/device:CPU:0", "/device:CPU:1"]
    checked = {(c.signature, c.output, c.device) for c in report.verification.checks}
    assert len(checked) == 3 * conftest.NUM_LOGICAL_CPUS
    assert report.verification.ok
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tf_bnfuse-")], "temporary folder left"


class MultiInput(tf.Module):
    """Input and output keys whose sorted order differs from their creation order."""

    def __init__(self):
        rng = np.random.default_rng(5)
        self.w = tf.Variable(rng.standard_normal((3, 3, 2, 4)).astype(np.float32))
        self.stats = [tf.Variable(v) for v in graphs.bn_params(4, rng)]

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 2], tf.float32, name="zeta_image"),
                                  tf.TensorSpec([None, 4], tf.float32, name="alpha_bias")])
    def serve(self, zeta_image, alpha_bias):
        y = tf.nn.conv2d(zeta_image, self.w, 1, "SAME")
        y = tf.raw_ops.FusedBatchNormV3(x=y, scale=self.stats[0], offset=self.stats[1], mean=self.stats[2],
                                        variance=self.stats[3], is_training=False)[0]
        pooled = tf.reduce_mean(y, [1, 2]) + alpha_bias
        return {"z_pooled": pooled, "a_map": y, "m_count": tf.shape(y)[0]}


def test_inputs_and_outputs_keep_their_keys_with_unknown_dims(tmp_path):
    src, out = str(tmp_path / "src"), str(tmp_path / "out")
    module = MultiInput()
    tf.saved_model.save(module, src, signatures=module.serve)
    report = fold_saved_model(src, out)
    assert len(report.signatures["serving_default"].folds) == 1
    folded = tf.saved_model.load(out).signatures["serving_default"]
    specs = folded.structured_input_signature[1]
    assert {k: (v.dtype, v.shape.as_list()) for k, v in specs.items()} == {
        "zeta_image": (tf.float32, [None, None, None, 2]), "alpha_bias": (tf.float32, [None, 4])}
    inputs = {"zeta_image": graphs.random((3, 5, 7, 2)), "alpha_bias": graphs.random((3, 4))}
    expected, actual = run_signature(src, "serving_default", inputs), run_signature(out, "serving_default", inputs)
    assert sorted(actual) == ["a_map", "m_count", "z_pooled"]
    for key in expected:
        assert actual[key].dtype == expected[key].dtype and actual[key].shape == expected[key].shape
        np.testing.assert_allclose(actual[key], expected[key], rtol=1e-4, atol=1e-5)


def test_only_requested_signatures_are_folded_and_kept(example_model, tmp_path):
    out = str(tmp_path / "out")
    report = fold_saved_model(example_model, out, signature_keys=["embedding"])
    assert list(report.signatures) == ["embedding"]
    assert list(tf.saved_model.load(out).signatures) == ["embedding"]


def test_unknown_signature_lists_the_available_ones(example_model, tmp_path):
    with pytest.raises(errors.BadInputError, match="no signature nope; available: embedding, serving_default"):
        fold_saved_model(example_model, str(tmp_path / "out"), signature_keys=["nope"])
    assert not os.path.exists(tmp_path / "out")


def test_existing_output_is_refused_untouched_and_replaced_with_overwrite(example_model, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(errors.BadInputError, match="not empty; pass overwrite=True"):  # the CLI's: --overwrite
        fold_saved_model(example_model, str(out))
    assert (out / "keep.txt").read_text() == "user data"
    fold_saved_model(example_model, str(out), overwrite=True)
    assert "keep.txt" not in os.listdir(out) and {"saved_model.pb", "variables"} <= set(os.listdir(out))


def test_output_inside_the_input_is_refused(example_model):
    with pytest.raises(errors.BadInputError, match="input folder or inside it"):
        fold_saved_model(example_model, os.path.join(example_model, "folded"))


def perturb_kernel(context, graph_def, outputs):  # pylint: disable=unused-argument
    """A test-only pass that makes a wrong fold: it scales one conv kernel by 1.01."""
    from tf_bnfuse import graph as graph_lib
    from tf_bnfuse import report as report_lib
    result = graph_lib.copy_graph_def(graph_def)
    index = graph_lib.GraphIndex(result)
    conv = next(n for n in result.node if n.op == "Conv2D")
    kernel = index.const_node(conv.input[1])
    value = tf.make_ndarray(kernel.attr["value"].tensor) * 1.01
    kernel.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(value))
    return result, report_lib.PassReport("perturb_kernel")


def test_a_wrong_fold_fails_verification_and_writes_nothing(example_model, tmp_path, monkeypatch):
    """A test-only pass perturbs one folded kernel: the fold's own check names it; with that check
    loosened out of the way, the output check still catches it."""
    monkeypatch.setitem(passes.REGISTRY, "perturb_kernel", perturb_kernel)
    out = str(tmp_path / "out")
    config = {"pipeline": ["fold_batch_norm", "perturb_kernel", "cleanup"]}
    with pytest.raises(errors.VerificationError, match=r"fold of \S+/FusedBatchNormV3 into \S+/Conv2D \(signature "
                                                       r"\w+\) fails its own check") as raised:
        fold_saved_model(example_model, out, config=config)
    folds = raised.value.run_report.verification.folds
    assert folds.failures() and all(c.linear_node.endswith("/Conv2D") for c in folds.failures())
    assert os.listdir(tmp_path) == [], "a failed run left files behind"
    config["verify"] = {"fold_rounding_multiple": 1e9}
    with pytest.raises(errors.VerificationError, match=r"signature \w+ output \w+ on /device:CPU:0"):
        fold_saved_model(example_model, out, config=config)
    assert os.listdir(tmp_path) == [], "a failed run left files behind"


def test_an_output_that_does_not_load_is_an_internal_error_and_nothing_is_written(example_model, tmp_path,
                                                                                   monkeypatch):
    """The written model failing to load is tf_bnfuse's fault: exit 3, never 2 ("bad input")."""
    from tf_bnfuse.savedmodel import write as write_lib
    saved = write_lib.save

    def save_then_truncate(model, path):
        saved(model, path)
        with open(os.path.join(path, "saved_model.pb"), "r+b") as f:
            f.truncate(100)
    monkeypatch.setattr(write_lib, "save", save_then_truncate)
    for verify in (True, False):
        with pytest.raises(errors.BnFuseError, match="the folded model does not load") as raised:
            fold_saved_model(example_model, str(tmp_path / "out"), verify=verify)
        assert raised.value.exit_code == errors.EXIT_INTERNAL
        assert os.listdir(tmp_path) == []


def test_a_write_that_fails_beside_the_fold_checks_is_raised_and_nothing_is_written(example_model, tmp_path,
                                                                                       monkeypatch):
    """The write runs in a thread of its own while the folds are checked: its error reaches the
    caller, from the caller's thread, once the checks are done, and the partly written output goes."""
    from tf_bnfuse.savedmodel import write as write_lib
    saved, threads = write_lib.save, []

    def save_then_fail(model, path):
        threads.append(threading.current_thread())
        saved(model, path)
        raise errors.BnFuseError("cannot write the folded SavedModel: no space left on device")
    monkeypatch.setattr(write_lib, "save", save_then_fail)
    with pytest.raises(errors.BnFuseError, match="no space left on device") as raised:
        fold_saved_model(example_model, str(tmp_path / "out"))
    assert threads and threads[0] is not threading.main_thread()
    assert raised.value.run_report.verification is None or raised.value.run_report.verification.folds.ok
    assert os.listdir(tmp_path) == []


def test_skip_verify_writes_without_checking(example_model, tmp_path):
    report = fold_saved_model(example_model, str(tmp_path / "out"), verify=False)
    assert report.verification is None and os.path.isfile(tmp_path / "out" / "saved_model.pb")


@pytest.mark.skipif(not tf.config.list_physical_devices("GPU"), reason="no GPU visible to TensorFlow")
def test_verification_covers_every_gpu(example_model, tmp_path):
    report = fold_saved_model(example_model, str(tmp_path / "out"))
    gpus = [d.name for d in tf.config.list_logical_devices("GPU")]
    assert set(gpus) <= set(report.verification.devices)
    assert {c.device for c in report.verification.checks} >= set(gpus)
    assert report.verification.ok


def test_cli_exits_1_naming_signature_output_and_device_when_verification_fails(
        example_model, tmp_path, monkeypatch, capsys):
    from tf_bnfuse import cli
    monkeypatch.setitem(passes.REGISTRY, "perturb_kernel", perturb_kernel)
    config = tmp_path / "faulty.json"
    # The folds' own checks loosened out of the way: this is the output check's message.
    config.write_text(json.dumps({"pipeline": ["fold_batch_norm", "perturb_kernel", "cleanup"],
                                  "verify": {"fold_rounding_multiple": 1e9}}))
    out = tmp_path / "out"
    cli.FLAGS.unparse_flags()
    # --verbosity=1 keeps this process's stderr as it is (the CLI otherwise re-points it);
    # --quiet: the error line only.
    cli.FLAGS(["tf_bnfuse", "--saved_model_dir", example_model, "--output_dir", str(out),
               "--config", str(config), "--verbosity=1", "--quiet"])
    try:
        code = cli.main(["tf_bnfuse"])
    finally:
        cli.FLAGS.unparse_flags()
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert len(err) == 1 and re.search(r"signature \w+ output \w+ on /device:CPU:0: max abs error", err[0])
    assert not out.exists()
