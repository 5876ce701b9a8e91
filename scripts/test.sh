#!/usr/bin/env bash
# The test command: installs everything into .venv (if needed), then runs the CPU test suite.
# GPU tests are marked and skip without CUDA (scripts/gpu_check.sh runs them on a GPU machine).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# spconv's CPU build lets the tests compare our sparse convolution with it (optional: skipped without it).
.venv/bin/python -m pip install -q -e ".[spconv]" >/dev/null 2>&1 || echo "note: spconv not installed; its comparison tests skip"
exec .venv/bin/python -m pytest -q "$@"
