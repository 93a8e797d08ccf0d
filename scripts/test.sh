#!/usr/bin/env bash
# Runs the test suite in the project's virtual environment (created if missing).
#   scripts/test.sh            everything (what CI runs)
#   scripts/test.sh --quick    the quick tier: tests marked `quick`, every module, under 3 minutes
# Other arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_venv.sh
args=()
for arg in "$@"; do
  if [ "$arg" = "--quick" ]; then args+=(-m quick); else args+=("$arg"); fi
done
exec .venv/bin/python -m pytest tests ${args[@]+"${args[@]}"}
