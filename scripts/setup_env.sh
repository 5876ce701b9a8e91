#!/usr/bin/env bash
# Creates (or updates) the project's virtual environment at .venv and installs everything the
# demo and the tests need. Safe to re-run. torch 2.13.0 (CPU build) is pinned so that a fresh
# machine takes the CPU wheel instead of a multi-GB CUDA build; on a GPU machine install your
# CUDA torch into the venv first and this script keeps it (any torch >= 2.5 works).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
    .venv/bin/python -m pip install -q "torch==2.13.0"
fi
.venv/bin/python -m pip install -q -e ".[dev]"
