#!/usr/bin/env bash
# The GPU records in one command, for a CUDA machine (issues 11 and 19): run the `gpu`
# tests, then train each preset named, quickest-to-matter first, and write each run's record
# (`cifar100 compare --record`) and one log into $OUT. Commit first: a record names the
# commit it was trained from, and one from a dirty tree does not count.
#
#   bash scripts/gpu-records.sh [PRESET ...]
#
# Default presets: efficientnet-lite0-finetune-gpu efficientnet-lite2-finetune-gpu cnn-fast
# mobilenetv2-finetune-gpu resnet18-gpu. Environment:
#   CIFAR100_DATA    folder holding cifar-100-python/ (unset: the download cache)
#   CIFAR100_PARTS   folder of parts made by ../shared/gpu/stage-cifar100.sh: checked against
#                    its parts.md5, unpacked into $CIFAR100_DATA, the files' md5 checked
#   CIFAR100_WEIGHTS, CIFAR100_EFFICIENTNET_LITE0_WEIGHTS   ImageNet weights (unset: cache,
#                    then download)
#   OUT              where records and the log go (default gpu-records/)
#   PYTHON           an interpreter whose torch sees the GPU (default python3)
#   TRAIN_ARGS       more `cifar100 train` flags for every preset, e.g.
#                    "--set transfer.stage2_epochs=20 --set train.compile=true"
#   RUNS             where the run folders go (default runs/)
#   SKIP_TESTS=1     train only; THROUGHPUT=1 also runs benchmarks/gpu_throughput.py
#   ALLOW_CPU=1      go on without a GPU (records named "cpu"): the script's own test
#
# For a machine that receives files in pieces (each transfer at most 64 MiB beside the
# checkout): stage the data set here (`bash ../shared/gpu/stage-cifar100.sh` -> .gpu-data/),
# copy each part and parts.md5 into one folder there (say /root/parts), one transfer each,
# bring the weight files in a last one, then run this with CIFAR100_PARTS=/root/parts
# CIFAR100_DATA=/root/c100 and the two weight variables pointing at them.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
out=${OUT:-gpu-records}
log="$out/gpu-records.log"
mkdir -p "$out"
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

fail() { echo "gpu-records: $*" | tee -a "$log" >&2; exit 1; }

unpack_parts() {
    [[ -n ${CIFAR100_DATA:-} ]] || fail "CIFAR100_PARTS needs CIFAR100_DATA, the folder to unpack into"
    (cd "$CIFAR100_PARTS" && md5sum --quiet -c parts.md5) || fail "$CIFAR100_PARTS: a part is missing or damaged"
    mkdir -p "$CIFAR100_DATA"
    cat "$CIFAR100_PARTS"/part-* | tar -x --no-same-owner -C "$CIFAR100_DATA"
    # The sums ../shared/gpu/README.md gives for the rebuilt files.
    (cd "$CIFAR100_DATA/cifar-100-python" && md5sum --quiet -c - <<'SUMS') || fail "$CIFAR100_DATA: rebuilt files differ"
b06947c30de70f5eb3c05a4cad474eb6  train
b3709b5663d5f61ee1887a2528c97ded  test
7973b15100ade9c7d40fb424638fde48  meta
SUMS
}

[[ -z ${CIFAR100_PARTS:-} ]] || unpack_parts
gpu=$("$python" -c 'import torch; print(torch.cuda.get_device_name().split()[-1].lower()
      if torch.cuda.is_available() else "cpu")' | tr -c 'a-z0-9\n' '-')
[[ $gpu != cpu || -n ${ALLOW_CPU:-} ]] || fail "$python: its torch does not see a CUDA GPU"
# The commit exactly as each record will name it (None: no git here, -dirty: not committed).
commit=$("$python" -c 'from cifar100.runs.folders import git_commit; print(git_commit())')
echo "gpu-records: commit $commit, $(date -u '+%F %T UTC')" | tee -a "$log"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$log" || true

if [[ -z ${SKIP_TESTS:-} ]]; then
    # A failing test is logged, not fatal: the records still say what ran and how fast.
    "$python" -m pytest -m gpu -q -p no:cacheprovider 2>&1 | tee -a "$log" \
        || echo "gpu-records: gpu tests FAILED (above)" | tee -a "$log"
fi
if [[ -n ${THROUGHPUT:-} ]]; then
    "$python" benchmarks/gpu_throughput.py --compile 2>&1 | tee "$out/gpu_throughput.txt"
fi

data_flag=()
[[ -z ${CIFAR100_DATA:-} ]] || data_flag=(--data-dir "$CIFAR100_DATA")
presets=("$@")
[[ ${#presets[@]} -gt 0 ]] || presets=(efficientnet-lite0-finetune-gpu efficientnet-lite2-finetune-gpu cnn-fast mobilenetv2-finetune-gpu resnet18-gpu)
runs=${RUNS:-runs}
mkdir -p "$runs"
status=0
for preset in "${presets[@]}"; do
    # A new folder each time: a trained run is never overwritten.
    run="$runs/$preset-$gpu-$(date -u +%Y%m%d-%H%M%S)"
    echo "== $preset -> $run" | tee -a "$log"
    # A preset that fails is logged and the next one still runs (device time is scarce).
    # shellcheck disable=SC2086  # TRAIN_ARGS is a list of flags: split on spaces
    if "$python" -m cifar100 train --preset "$preset" "${data_flag[@]}" ${TRAIN_ARGS:-} \
        --run-dir "$run" --json 2>&1 | tee -a "$log" \
        && "$python" -m cifar100 compare --record "$run" --to "$out/$preset-$gpu.json" 2>&1 \
        | tee -a "$log"; then
        continue
    fi
    echo "gpu-records: $preset FAILED (above)" | tee -a "$log"
    status=1
done
exit $status
