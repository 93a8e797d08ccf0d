#!/usr/bin/env bash
# Creates .venv (if missing) and installs tf_bnfuse with its test extra into it, at the exact
# versions of constraints.txt (the ones the tests pass on).
# Re-running is cheap: pip is skipped while pyproject.toml and constraints.txt are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=".venv/.tf_bnfuse-installed"
want="$(cat pyproject.toml setup.py constraints.txt | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -c constraints.txt -e '.[test]'
  echo "$want" > "$stamp"
fi
