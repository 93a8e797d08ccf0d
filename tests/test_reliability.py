"""Bad input, kills, overwrite and numerics: a clear error, nothing lost, nothing half-written."""

import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import conftest
import graphs
from savedmodel_checks import compare_outputs
from cli_checks import assert_one_line_error, run_cli
from tf_bnfuse import fold_graph_def
from tf_bnfuse import fold_saved_model
from tf_bnfuse.savedmodel import output_dir


def build_tf1_saved_model(path, tags, signature_key):
    """A TF1-style SavedModel (variables, Builder) with its own tags and signature key."""
    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [None, 8, 8, 3], name="x")
        w = tf.compat.v1.Variable(graphs.random((3, 3, 3, 4)), name="w")
        params = [tf.compat.v1.Variable(v, name=n) for v, n in zip(graphs.bn_params(4), "gbmv")]
        y = tf.nn.conv2d(x, w, 1, "SAME")
        y = tf.raw_ops.FusedBatchNormV3(x=y, scale=params[0], offset=params[1], mean=params[2],
                                        variance=params[3], is_training=False)[0]
        with tf.compat.v1.Session(graph=graph) as session:
            session.run(tf.compat.v1.global_variables_initializer())
            builder = tf.compat.v1.saved_model.Builder(path)
            signature = tf.compat.v1.saved_model.signature_def_utils.predict_signature_def({"image": x}, {"y": y})
            builder.add_meta_graph_and_variables(session, tags, signature_def_map={signature_key: signature})
            builder.save()
    return path


def test_tf1_saved_model_tags_and_signatures(tmp_path):
    src = build_tf1_saved_model(str(tmp_path / "tf1"), ["train", "custom"], "predict")
    out = tmp_path / "out"
    assert_one_line_error(run_cli("--saved_model_dir", src, "--output_dir", str(out)), 2,
                          "no MetaGraph with tags serve", "available tag sets: custom,train", src)
    assert_one_line_error(run_cli("--saved_model_dir", src, "--output_dir", str(out), "--tags", "train,custom",
                                  "--signature_keys", "serving_default"), 2, "available: predict")
    assert not out.exists()
    report = fold_saved_model(src, str(out), tags=["train", "custom"])
    assert len(report.signatures["predict"].folds) == 1 and report.verification.ok


def test_truncated_saved_model_pb_and_missing_variables(example_model, tmp_path):
    truncated = tmp_path / "truncated"
    shutil.copytree(example_model, truncated)
    pb = truncated / "saved_model.pb"
    pb.write_bytes(pb.read_bytes()[: pb.stat().st_size // 2])
    assert_one_line_error(run_cli("--saved_model_dir", str(truncated), "--output_dir", str(tmp_path / "o")), 2,
                          str(truncated))
    no_variables = tmp_path / "no_variables"
    shutil.copytree(example_model, no_variables)
    shutil.rmtree(no_variables / "variables")
    assert_one_line_error(run_cli("--saved_model_dir", str(no_variables), "--output_dir", str(tmp_path / "o")), 2,
                          "no variables/ folder", str(no_variables))
    assert not (tmp_path / "o").exists()


@pytest.mark.quick
def test_output_equal_to_input_is_refused(example_model):
    before = conftest.tree_digest(example_model)
    assert_one_line_error(run_cli("--saved_model_dir", example_model, "--output_dir", example_model,
                                  "--overwrite"), 2, "input folder")
    assert conftest.tree_digest(example_model) == before


def test_overwrite_replaces_the_old_output_in_one_step(example_model, tmp_path):
    out = tmp_path / "out"
    fold_saved_model(example_model, str(out), signature_keys=["embedding"])
    (out / "marker").write_text("old")
    fold_saved_model(example_model, str(out), overwrite=True)
    assert not (out / "marker").exists()
    assert sorted(tf.saved_model.load(str(out)).signatures) == ["embedding", "serving_default"]
    assert [p for p in os.listdir(tmp_path)] == ["out"], "scratch folder left behind"


def test_exchange_swaps_two_folders_atomically(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "f").write_text("a")
    (b / "f").write_text("b")
    if not output_dir.exchange(str(a), str(b)):
        pytest.skip("renameat2(RENAME_EXCHANGE) is not available here; the fallback is two renames")
    assert (a / "f").read_text() == "b" and (b / "f").read_text() == "a"


@pytest.mark.quick
def test_stale_scratch_of_a_dead_process_is_removed_and_a_live_ones_kept(example_model, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for name, pid in (("dead", dead.pid), ("live", os.getpid())):
        folder = tmp_path / (output_dir.SCRATCH_PREFIX + name)
        folder.mkdir()
        (folder / output_dir.OWNER_FILE).write_text(str(pid))
        (folder / "half_written").write_text("x")
    fold_saved_model(example_model, str(tmp_path / "out"), signature_keys=["embedding"])
    assert sorted(os.listdir(tmp_path)) == [".tf_bnfuse-live", "out"]


@pytest.fixture(scope="module")
def keras3_model(tmp_path_factory):
    """A small Keras 3 export: the pause hook, not the model's size, makes each kill land in its phase."""
    import keras
    import model_zoo
    path, _ = model_zoo.build(keras, "separable_bn", str(tmp_path_factory.mktemp("keras3")))
    return path


# The phase boundaries where the run can pause (cli.PAUSE_ENV): the last before the scratch folder
# is made (a kill at an earlier one leaves the disk as this one does: nothing of the run on it),
# each after it, and once the output is in place.
BOUNDARIES = ["passes serve", "write", "verify", "move into place", "moved into place"]


def test_a_kill_at_any_phase_leaves_no_output_or_a_complete_one(keras3_model, tmp_path):
    """SIGKILL the CLI at each phase boundary (the test hook pauses it there, so the kill lands
    where it should however busy the machine is); then a plain re-run must work."""
    from tf_bnfuse import cli
    out = tmp_path / "out"
    for boundary in BOUNDARIES:
        with conftest.environment_of_a_killed_process({cli.PAUSE_ENV: boundary}) as environment:
            process = subprocess.Popen([sys.executable, "-m", "tf_bnfuse", "--saved_model_dir", keras3_model,
                                        "--output_dir", str(out), "--verbosity=0", "--overwrite"],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=environment)
            for line in process.stderr:
                if "paused at %s (" % boundary in line:
                    process.send_signal(signal.SIGKILL)
                    break
            process.wait(timeout=600)
        assert process.returncode == -signal.SIGKILL, "the run ended before %r" % boundary
        if boundary == "moved into place":
            assert out.exists()
        if out.exists():  # the kill landed after the rename: it must be complete
            compare_outputs(keras3_model, str(out))
    result = run_cli("--saved_model_dir", keras3_model, "--output_dir", str(out), "--overwrite")
    assert result.returncode == 0, result.stderr
    compare_outputs(keras3_model, str(out))
    assert os.listdir(tmp_path) == ["out"], "a killed run's scratch folder was not cleaned up"


@pytest.mark.parametrize("case,values", [
    ("zero variance", {"var": 0.0}),
    ("tiny variance", {"var": 1e-12}),
    ("gamma zero", {"gamma": 0.0}),
    ("negative gamma", {"gamma": -1.5}),
    ("large epsilon", {"epsilon": 10.0}),
])
@pytest.mark.quick
def test_numeric_edge_cases_fold_exactly(case, values):
    gamma, beta, mean, var = graphs.bn_params(4)
    if "var" in values:
        var[1] = values["var"]
    if "gamma" in values:
        gamma[2] = values["gamma"]

    def build():
        x = tf.compat.v1.placeholder(tf.float32, [None, 6, 6, 3], name="x")
        y = tf.nn.conv2d(x, graphs.const(graphs.random((3, 3, 3, 4)), "w"), 1, "SAME", name="conv")
        bn = graphs.fused_batch_norm(y, 4, "bn", params=(gamma, beta, mean, var),
                                     epsilon=values.get("epsilon", 1e-3))
        tf.identity(bn[0], name="out")

    graph_def, _ = graphs.build(build)
    folded, report = fold_graph_def(graph_def, ["out"])
    assert len(report.folds) == 1 and graphs.batch_norm_nodes(folded) == []
    feeds = {"x": graphs.random((2, 6, 6, 3))}
    expected, = graphs.run(graph_def, feeds, ["out"])
    actual, = graphs.run(folded, feeds, ["out"])
    scale = np.abs(expected).max()
    assert np.abs(actual - expected).max() <= 1e-5 * scale + 1e-6


@pytest.mark.quick
@pytest.mark.parametrize("bad", [np.inf, np.nan])
def test_inf_or_nan_statistics_are_refused_with_a_reason(bad):
    gamma, beta, mean, var = graphs.bn_params(4)
    mean[0] = bad

    def build():
        x = tf.compat.v1.placeholder(tf.float32, [None, 6, 6, 3], name="x")
        y = tf.nn.conv2d(x, graphs.const(graphs.random((3, 3, 3, 4)), "w"), 1, "SAME", name="conv")
        tf.identity(graphs.fused_batch_norm(y, 4, "bn", params=(gamma, beta, mean, var))[0], name="out")

    graph_def, _ = graphs.build(build)
    _, report = fold_graph_def(graph_def, ["out"])
    assert report.folds == [] and "mean (bn/mean) has NaN or Inf values" in report.skips[0].reason


class HalfPrecisionNet(tf.Module):
    def __init__(self, dtype):
        rng = np.random.default_rng(3)
        self.dtype = dtype
        self.w = tf.Variable(tf.cast(rng.standard_normal((3, 3, 3, 8)) / 5, dtype))
        self.stats = [tf.Variable(v) for v in graphs.bn_params(8, rng)]  # float32, as mixed precision keeps them

    @tf.function(input_signature=[tf.TensorSpec([None, 8, 8, 3], tf.float32, name="x")])
    def serve(self, x):
        y = tf.nn.conv2d(tf.cast(x, self.dtype), self.w, 1, "SAME")
        y = tf.raw_ops.FusedBatchNormV3(x=y, scale=self.stats[0], offset=self.stats[1], mean=self.stats[2],
                                        variance=self.stats[3], is_training=False)[0]
        return {"y": tf.nn.relu(y)}


@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16])
def test_half_precision_conv_verifies_within_the_configured_tolerance(dtype, tmp_path):
    module = HalfPrecisionNet(dtype)
    src, out = str(tmp_path / "src"), str(tmp_path / "out")
    tf.saved_model.save(module, src, signatures=module.serve)
    report = fold_saved_model(src, out)
    assert len(report.signatures["serving_default"].folds) == 1
    config = __import__("tf_bnfuse.config", fromlist=["load_config"]).load_config()
    tolerance = config["verify"]["tolerance"][dtype.name]
    assert {(c.rtol, c.atol) for c in report.verification.checks} == {(tolerance["rtol"], tolerance["atol"])}
    assert report.verification.ok
    compare_outputs(src, out, rtol=tolerance["rtol"])


def test_a_scratch_folder_removed_part_way_still_names_its_owner(tmp_path, monkeypatch):
    """A kill while a finished run removes its scratch folder must leave the owner file to the
    last, so that the next run can tell the folder is a dead process's and remove it."""
    folder = tmp_path / (output_dir.SCRATCH_PREFIX + "x")
    (folder / "saved_model" / "variables").mkdir(parents=True)
    (folder / "saved_model" / "saved_model.pb").write_text("x")
    (folder / output_dir.OWNER_FILE).write_text("1")
    removed = []
    real_rmtree = output_dir.shutil.rmtree

    def killed_after_the_first(path, ignore_errors=False):
        removed.append(os.path.basename(path))
        if len(removed) == 1:
            real_rmtree(path, ignore_errors=ignore_errors)
            raise KeyboardInterrupt  # stands for the kill
    monkeypatch.setattr(output_dir.shutil, "rmtree", killed_after_the_first)
    with pytest.raises(KeyboardInterrupt):
        output_dir.remove_scratch(str(folder))
    assert removed == ["saved_model"]
    assert (folder / output_dir.OWNER_FILE).exists()
