#!/usr/bin/env bash
# Builds the small example SavedModel and folds it with the CLI.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_venv.sh
rm -rf build/example_model
.venv/bin/python examples/build_example_model.py build/example_model
.venv/bin/python -m tf_bnfuse --saved_model_dir build/example_model --output_dir build/example_folded \
  --overwrite "$@"
