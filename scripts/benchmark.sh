#!/usr/bin/env bash
# Runs the benchmark in the project's virtual environment (created if missing), with matplotlib.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_venv.sh
.venv/bin/python -c "import matplotlib" 2>/dev/null || .venv/bin/python -m pip install --quiet -e '.[bench]'
exec .venv/bin/python benchmarks/run_benchmark.py "$@"
