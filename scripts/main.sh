#!/usr/bin/env bash
# Set up .venv, then the main job: train the custom CNN on the quick preset, evaluate the
# best checkpoint on the test set, and write the report. Extra arguments go to `train`,
# e.g. `bash scripts/main.sh --preset cnn-fast` for the 20-minute recipe.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The project's dev and CI machines have no internet but a local mirror beside the checkout.
if [ -z "${CIFAR100_DATA:-}" ] && [ -d ../shared/datasets/cifar-100-python ]; then
  export CIFAR100_DATA="$(cd ../shared/datasets && pwd)"
fi
RUN_DIR="runs/main-$(date +%Y%m%d-%H%M%S)"
.venv/bin/cifar100 train --preset quick --run-dir "$RUN_DIR" "$@"
.venv/bin/cifar100 evaluate "$RUN_DIR" --tta
