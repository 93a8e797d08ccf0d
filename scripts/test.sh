#!/usr/bin/env bash
# Runs the test suite in the project's virtual environment (created if missing).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_venv.sh
exec .venv/bin/python -m pytest tests "$@"
