"""The command line, run as a user runs it: a subprocess."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import conftest
import graphs


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "tf_bnfuse", *args], capture_output=True, text=True,
                          timeout=600)


def assert_one_line_error(result, code, *fragments):
    assert result.returncode == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("tf_bnfuse: error: ") and "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_cli_folds_the_example_and_prints_a_summary(example_model, tmp_path):
    out, report_path = str(tmp_path / "out"), str(tmp_path / "report.json")
    before = conftest.tree_digest(example_model)
    result = run_cli("--saved_model_dir", example_model, "--output_dir", out, "--report_json", report_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
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


def test_missing_flag_and_unknown_flag_exit_2(tmp_path):
    assert_one_line_error(run_cli("--output_dir", str(tmp_path / "o")), 2, "--saved_model_dir is required")
    assert_one_line_error(run_cli("--no_such_flag=1"), 2, "no_such_flag")


def test_unknown_signature_exits_2_and_lists_available(example_model, tmp_path):
    result = run_cli("--saved_model_dir", example_model, "--output_dir", str(tmp_path / "o"),
                     "--signature_keys", "serve_v9")
    assert_one_line_error(result, 2, "serve_v9", "available: embedding, serving_default")


def test_bad_config_exits_2(example_model, tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({"pipeline": ["fold_everything"]}))
    for config, fragment in ((broken, "not valid JSON"), (unknown, "unknown pass 'fold_everything'")):
        result = run_cli("--saved_model_dir", example_model, "--output_dir", str(tmp_path / "o"),
                         "--config", str(config))
        assert_one_line_error(result, 2, fragment, str(config))
    assert not (tmp_path / "o").exists()


def test_non_empty_output_is_refused_without_overwrite(example_model, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "precious").write_text("keep me")
    result = run_cli("--saved_model_dir", example_model, "--output_dir", str(out))
    assert_one_line_error(result, 2, "--overwrite")
    assert (out / "precious").read_text() == "keep me"
