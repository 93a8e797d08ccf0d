"""Running the CLI as a user runs it, in a subprocess, and reading its one-line errors."""

import subprocess
import sys


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "tf_bnfuse", *args], capture_output=True, text=True,
                          timeout=600)


def error_lines(stderr):
    """stderr without the progress lines ("tf_bnfuse [  1.2 s] ...")."""
    return [line for line in stderr.strip().splitlines() if not line.startswith("tf_bnfuse [")]


def assert_one_line_error(result, code, *fragments):
    assert result.returncode == code, result.stderr
    lines = error_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("tf_bnfuse: error: ") and "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0]
