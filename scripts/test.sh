#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite, real-data checks included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export CIFAR100_SHARED="${CIFAR100_SHARED:-$(cd .. && pwd)/shared}"
.venv/bin/ruff check src tests benchmarks
.venv/bin/python -m pytest -q "$@"
