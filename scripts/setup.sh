#!/usr/bin/env bash
# Create .venv and install the project. CPU machines get the CPU build of PyTorch
# (torch==2.13.0); set TORCH_SPEC to choose another build, e.g. TORCH_SPEC="torch" on a GPU box.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
.venv/bin/python -m pip install -q -e ".[${EXTRAS:-dev}]"
