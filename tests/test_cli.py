"""The command line, run as a user runs it: a subprocess."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import conftest
import graphs
from cli_checks import assert_one_line_error, error_lines, run_cli
from tf_bnfuse import cli


@pytest.mark.quick
def test_cli_folds_the_example_and_prints_a_summary(example_model, tmp_path):
    out, report_path = str(tmp_path / "out"), str(tmp_path / "report.json")
    before = conftest.tree_digest(example_model)
    result = run_cli("--saved_model_dir", example_model, "--output_dir", out, "--report_json", report_path)
    assert result.returncode == 0, result.stderr
    assert error_lines(result.stderr) == []
    assert "load done in" in result.stderr and "verify done in" in result.stderr  # progress, by default
    # TensorFlow's own log lines (its checkpoint writer's, say) are not shown as tf_bnfuse's, nor at all
    assert all(line.startswith("tf_bnfuse [") for line in result.stderr.splitlines()), result.stderr
    assert "fingerprint" not in result.stderr and "Sharding" not in result.stderr
    assert result.stdout.strip().splitlines()[-1].startswith(
        "wrote %s: 5 folded, 1 left alone, verified on 1 device, " % out)
    assert "signature serving_default: " in result.stdout
    assert "folded  StatefulPartitionedCall/FusedBatchNormV2 (FusedBatchNormV2) into" in result.stdout
    assert "has 2 consumers" in result.stdout
    assert "verification on /device:CPU:0: passed" in result.stdout
    assert conftest.tree_digest(example_model) == before

    report = json.load(open(report_path))
    passes = {p["pass_name"]: p for p in report["signatures"]["serving_default"]["passes"]}
    assert len(passes["fold_batch_norm"]["folds"]) == 3
    image = graphs.random((2, 16, 16, 3))
    expected = tf.saved_model.load(example_model).signatures["serving_default"](image=image)
    actual = tf.saved_model.load(out).signatures["serving_default"](image=image)
    np.testing.assert_allclose(actual["logits"].numpy(), expected["logits"].numpy(), rtol=1e-4, atol=1e-5)


def test_the_tflite_phase_shows_its_steps_as_they_happen(example_model, tmp_path):
    result = run_cli("--saved_model_dir", example_model, "--output_dir", str(tmp_path / "out"), "--tflite_output",
                     str(tmp_path / "model.tflite"))
    assert result.returncode == 0, result.stderr
    lines = [line.split("] ", 1)[1] for line in result.stderr.splitlines()]
    tflite = lines[lines.index("tflite ..."):]
    assert [line.strip().split(" ")[0] for line in tflite[1:4]] == ["converting", "converting", "checking"], tflite
    assert tflite[4].startswith("tflite done in"), tflite


def test_console_script_is_installed(example_model, tmp_path):
    script = os.path.join(os.path.dirname(sys.executable), "tf_bnfuse")
    result = subprocess.run([script, "--saved_model_dir", example_model, "--output_dir", str(tmp_path / "o"),
                             "--signature_keys", "embedding"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "signature embedding: " in result.stdout and "serving_default" not in result.stdout


def test_skip_verify_warns_loudly(example_model, tmp_path):
    result = run_cli("--saved_model_dir", example_model, "--output_dir", str(tmp_path / "o"), "--skip_verify")
    assert result.returncode == 0
    assert "NOT compared" in result.stdout and "NOT compared" in result.stderr


@pytest.mark.quick
@pytest.mark.parametrize("case", ["missing", "empty", "not_a_saved_model", "corrupt"])
def test_bad_input_folder_exits_2_with_one_line(case, tmp_path):
    src = tmp_path / "in"
    if case != "missing":
        src.mkdir()
    if case == "not_a_saved_model":
        (src / "model.h5").write_bytes(b"x")
    if case == "corrupt":
        (src / "saved_model.pb").write_bytes(b"\x08\x01garbage")
        (src / "variables").mkdir()
    out = tmp_path / "out"
    result = run_cli("--saved_model_dir", str(src), "--output_dir", str(out))
    assert_one_line_error(result, 2, str(src))
    assert not out.exists()


@pytest.mark.quick
def test_missing_flag_and_unknown_flag_exit_2(tmp_path):
    assert_one_line_error(run_cli("--output_dir", str(tmp_path / "o")), 2, "--saved_model_dir is required")
    assert_one_line_error(run_cli("--no_such_flag=1"), 2, "no_such_flag")


def test_unknown_signature_exits_2_and_lists_available(example_model, tmp_path):
    result = run_cli("--saved_model_dir", example_model, "--output_dir", str(tmp_path / "o"),
                     "--signature_keys", "serve_v9")
    assert_one_line_error(result, 2, "serve_v9", "available: embedding, serving_default")


@pytest.mark.quick
def test_bad_config_exits_2(example_model, tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({"pipeline": ["fold_everything"]}))
    bad_option = tmp_path / "bad_option.json"
    bad_option.write_text(json.dumps({"pipeline": [{"pass": "constant_folding", "no_such_option": 1}, "cleanup"]}))
    for config, fragment in ((broken, "not valid JSON"), (unknown, "unknown pass 'fold_everything'"),
                             (bad_option, "pass constant_folding takes no option no_such_option")):
        result = run_cli("--saved_model_dir", example_model, "--output_dir", str(tmp_path / "o"),
                         "--config", str(config))
        assert_one_line_error(result, 2, fragment, str(config))
    assert not (tmp_path / "o").exists()


@pytest.mark.quick
def test_non_empty_output_is_refused_without_overwrite(example_model, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "precious").write_text("keep me")
    result = run_cli("--saved_model_dir", example_model, "--output_dir", str(out))
    assert_one_line_error(result, 2, "--overwrite")
    assert (out / "precious").read_text() == "keep me"


@pytest.mark.quick
def test_help_lists_the_tools_own_flags_and_exits_0():
    for flag in ("--help", "-h"):
        result = run_cli(flag)
        assert result.returncode == 0, result.stderr
        for own in ("--saved_model_dir", "--output_dir", "--skip_verify", "--verify_inputs", "--report_json",
                    "--quiet", "exit codes:", "130", "example:"):
            assert own in result.stdout, own
        assert "--only_check_args" not in result.stdout, "absl's own flags belong to --helpfull"


@pytest.mark.quick
def test_version_names_tf_bnfuse_tensorflow_and_keras():
    result = run_cli("--version")
    assert result.returncode == 0
    import keras
    import tf_bnfuse
    assert "tf_bnfuse %s\n" % tf_bnfuse.__version__ in result.stdout
    assert "tensorflow %s\n" % tf.__version__ in result.stdout
    assert "keras %s\n" % keras.__version__ in result.stdout


def run_cli_reporting_tf_import(*args):
    """Runs the CLI in a process that says on exit whether TensorFlow was imported."""
    code = ("import atexit, sys; atexit.register(lambda: sys.stderr.write("
            "'TF IMPORTED\\n' if 'tensorflow' in sys.modules else '')); "
            "sys.argv = ['tf_bnfuse'] + %r; from tf_bnfuse import cli; cli.run()" % (list(args),))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)


@pytest.mark.quick
def test_paths_and_config_are_checked_before_tensorflow_is_imported(example_model, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    wrong_type = tmp_path / "wrong_type.json"
    config = json.load(open(os.path.join(conftest.REPO, "configs", "default.json")))
    config["verify"]["batch_size"] = "two"
    wrong_type.write_text(json.dumps(config))
    cases = [
        (["--saved_model_dir", str(tmp_path / "nope"), "--output_dir", str(tmp_path / "o")], "does not exist"),
        (["--saved_model_dir", str(a_file), "--output_dir", str(tmp_path / "o")], "is a file, not a folder"),
        (["--saved_model_dir", example_model, "--output_dir", str(a_file / "o")], "is a file, not a folder"),
        (["--saved_model_dir", example_model, "--output_dir", str(tmp_path / "o"), "--config", str(wrong_type)],
         'verify.batch_size must be a whole number >= 1, not "two"'),
        (["--saved_model_dir", example_model, "--output_dir", str(tmp_path / "o"),
          "--report_json", str(tmp_path / "missing" / "r.json")], "does not exist"),
        (["--saved_model_dir", example_model, "--output_dir", str(tmp_path / "o"),
          "--verify_inputs", str(a_file)], "is not a .npz file"),
    ]
    for args, fragment in cases:
        result = run_cli_reporting_tf_import(*args)
        assert "TF IMPORTED" not in result.stderr, (args, result.stderr)
        assert_one_line_error(result, 2, fragment)
    assert not (tmp_path / "o").exists() and not (tmp_path / "missing").exists()


def test_report_json_is_written_on_failure_with_status_and_versions(example_model, tmp_path):
    report_path = tmp_path / "report.json"
    result = run_cli("--saved_model_dir", example_model, "--output_dir", str(tmp_path / "o"),
                     "--signature_keys", "serve_v9", "--report_json", str(report_path))
    assert_one_line_error(result, 2, "serve_v9")
    report = json.load(open(report_path))
    assert report["status"] == "failed" and report["exit_code"] == 2 and "serve_v9" in report["message"]
    assert report["versions"]["tensorflow"] == tf.__version__
    assert report["flags"]["signature_keys"] == ["serve_v9"] and report["config"]["pipeline"]
    assert [p["name"] for p in report["phases"]] == []  # the load failed: no phase finished


def test_report_json_on_success_has_status_config_and_folds(example_model, tmp_path):
    report_path = tmp_path / "report.json"
    result = run_cli("--saved_model_dir", example_model, "--output_dir", str(tmp_path / "o"), "--quiet",
                     "--report_json", str(report_path))
    assert result.returncode == 0 and result.stderr == "", result.stderr  # --quiet: no progress
    report = json.load(open(report_path))
    assert report["status"] == "ok" and report["exit_code"] == 0 and report["message"] == ""
    passes = {p["pass_name"]: p for p in report["signatures"]["serving_default"]["passes"]}
    assert len(passes["fold_batch_norm"]["folds"]) == 3
    assert report["verification"]["checks"] and report["verification"]["random_outputs"] == []


def _scratch_folders(folder):
    return [p for p in os.listdir(folder) if p.startswith(".tf_bnfuse-")]


def _signalled_run(model, out, sig, wait_for, env=None):
    """Starts the CLI, waits until a stderr line contains wait_for (an event, not a time), sends
    sig; returns (exit code, stdout, stderr)."""
    with conftest.environment_of_a_killed_process(env) as environment:
        process = subprocess.Popen([sys.executable, "-m", "tf_bnfuse", "--saved_model_dir", model, "--output_dir",
                                    str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   env=environment)
        seen = []
        for line in process.stderr:
            seen.append(line)
            if wait_for in line:
                break
        process.send_signal(sig)
        stdout, rest = process.communicate(timeout=300)
    return process.returncode, stdout, "".join(seen) + rest


def _assert_nothing_written(code, stderr, sig, out):
    if sig == signal.SIGINT:
        assert code == 130, stderr
        lines = [line for line in error_lines(stderr) if "(%s)" % cli.PAUSE_ENV not in line]  # the hook's own
        assert lines == ["tf_bnfuse: error: interrupted; nothing written"], stderr
        assert "Traceback" not in stderr
    else:
        assert code == -signal.SIGTERM, stderr
    assert not out.exists()
    assert _scratch_folders(out.parent) == []


BOUNDARIES = ["load", "freeze", "passes", "write", "verify", "move into place"]


@pytest.mark.parametrize("boundary", BOUNDARIES)
def test_a_signal_at_any_phase_boundary_ends_the_run_even_when_swallowed(example_model, tmp_path, boundary):
    """The test hook pauses the run at the boundary and swallows the KeyboardInterrupt there, as
    TensorFlow code may: the recorded signal still ends the run, with nothing written."""
    out = tmp_path / "o"
    code, _, stderr = _signalled_run(example_model, out, signal.SIGINT, "paused at " + boundary,
                                     {cli.PAUSE_ENV: boundary})
    _assert_nothing_written(code, stderr, signal.SIGINT, out)


def test_sigterm_at_a_phase_boundary_ends_the_run_as_sigterm(example_model, tmp_path):
    out = tmp_path / "o"
    code, _, stderr = _signalled_run(example_model, out, signal.SIGTERM, "paused at write", {cli.PAUSE_ENV: "write"})
    _assert_nothing_written(code, stderr, signal.SIGTERM, out)


def test_a_signal_after_the_output_is_in_place_finishes_and_says_so(example_model, tmp_path):
    out = tmp_path / "o"
    code, stdout, stderr = _signalled_run(example_model, out, signal.SIGINT, "paused at moved into place",
                                          {cli.PAUSE_ENV: "moved into place"})
    assert code == 0, stderr
    assert "SIGINT arrived after the output was moved into place: the output is complete and verified" in stdout
    assert tf.saved_model.load(str(out)).signatures["serving_default"] is not None
    assert _scratch_folders(tmp_path) == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_the_write_leaves_nothing_or_a_finished_run(example_model, tmp_path, sig):
    out = tmp_path / "o"
    code, stdout, stderr = _signalled_run(example_model, out, sig, "write ...")
    if code == 0:  # only when the signal came once the output was in place
        assert "arrived after the output was moved into place" in stdout, stderr
        assert out.exists()
    else:
        _assert_nothing_written(code, stderr, sig, out)


@pytest.fixture(scope="module")
def unknown_rank_models(tmp_path_factory):
    """consumer -> (path, inputs) of a model whose input has unknown rank and feeds a conv,
    directly or through a Reshape to a constant shape; each built once, on first use, only read."""
    import io_models
    built = {}

    def model(consumer):
        if consumer not in built:
            src = str(tmp_path_factory.mktemp("unknown_rank") / "src")
            built[consumer] = src, io_models.unknown_rank(src, consumer)
        return built[consumer]
    return model


# An unverified run must still make test inputs of the right shape (its output runs on them):
# checked once, on the model whose input feeds the conv directly.
@pytest.mark.parametrize("consumer,skip_verify", [("conv", False), ("reshape", False), ("conv", True)])
def test_an_input_of_unknown_rank_gets_test_inputs_of_the_shape_its_consumer_needs(unknown_rank_models, consumer,
                                                                                   skip_verify, tmp_path):
    from savedmodel_checks import compare_in_fresh_process, signature_defs
    (src, inputs), out = unknown_rank_models(consumer), str(tmp_path / "out")
    result = run_cli("--saved_model_dir", src, "--output_dir", out, *(["--skip_verify"] if skip_verify else []))
    assert result.returncode == 0, result.stderr
    assert "1 folded" in result.stdout and ("verified" in result.stdout) != skip_verify
    assert signature_defs(out) == signature_defs(src)
    compare_in_fresh_process(src, out, inputs)


def test_an_input_of_unknown_rank_nothing_explains_needs_verify_inputs(tmp_path):
    import io_models
    src = str(tmp_path / "src")
    inputs = io_models.unknown_rank(src, "reduce")
    for extra in ([], ["--skip_verify"]):  # the output must run on test inputs even unverified
        result = run_cli("--saved_model_dir", src, "--output_dir", str(tmp_path / "out"), *extra)
        assert_one_line_error(result, 2, "input x has unknown rank", "pass --verify_inputs")
        assert "--skip_verify" not in error_lines(result.stderr)[0]
        assert not (tmp_path / "out").exists()
    given = tmp_path / "inputs.npz"
    np.savez(given, x=inputs["serving_default"][0]["x"])
    result = run_cli("--saved_model_dir", src, "--output_dir", str(tmp_path / "out"), "--verify_inputs", str(given))
    assert result.returncode == 0, result.stderr


def test_verify_inputs_are_used_and_wrong_shapes_refused(example_model, tmp_path):
    images = graphs.random((3, 16, 16, 3))
    given = tmp_path / "inputs.npz"
    np.savez(given, image=images)
    report_path = tmp_path / "report.json"
    result = run_cli("--saved_model_dir", example_model, "--output_dir", str(tmp_path / "o"),
                     "--verify_inputs", str(given), "--report_json", str(report_path))
    assert result.returncode == 0, result.stderr
    report = json.load(open(report_path))
    assert report["verification"]["inputs"] == {"embedding/image": "given (--verify_inputs)",
                                                "serving_default/image": "given (--verify_inputs)"}

    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, **{"serving_default/image": graphs.random((3, 15, 16, 3))})
    result = run_cli("--saved_model_dir", example_model, "--output_dir", str(tmp_path / "o2"),
                     "--verify_inputs", str(wrong))
    assert_one_line_error(result, 2, "serving_default/image has shape (3, 15, 16, 3)", "(-1, 16, 16, 3)")
    unknown = tmp_path / "unknown.npz"
    np.savez(unknown, pixels=images)
    result = run_cli("--saved_model_dir", example_model, "--output_dir", str(tmp_path / "o2"),
                     "--verify_inputs", str(unknown))
    assert_one_line_error(result, 2, "pixels names no signature input")
    assert not (tmp_path / "o2").exists()
