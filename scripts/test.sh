#!/usr/bin/env bash
# The test command: installs everything into .venv (if needed), then runs the CPU test suite.
# GPU tests are marked and skip without CUDA (scripts/gpu_check.sh runs them on a GPU machine).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m pytest -q "$@"
