#!/usr/bin/env bash
# The GPU records in one command, for a CUDA machine: run the `gpu` tests and the
# throughput rows, then train each preset named, quickest-to-matter first, and write each
# run's record (`cifar100 compare --record`) and one log into $OUT. Commit first: a record names the
# commit it was trained from, and one from a dirty tree does not count.
#
#   bash scripts/gpu-records.sh [PRESET ...]
#
# Default presets: efficientnet-lite0-finetune-gpu efficientnet-lite2-finetune-gpu cnn-fast
# mobilenetv2-finetune-gpu resnet18-gpu. Environment:
#   CIFAR100_DATA    folder holding cifar-100-python/ (unset: the download cache)
#   CIFAR100_PACKED  folder holding part-a, part-b and pack-cifar100.py, made by
#                    ../shared/gpu/stage-cifar100-packed.sh (two transfers): joined and
#                    unpacked into $CIFAR100_DATA, every rebuilt file md5-checked
#   CIFAR100_PARTS   folder of parts made by ../shared/gpu/stage-cifar100.sh: checked against
#                    its parts.md5, unpacked into $CIFAR100_DATA, the files' md5 checked
#   CIFAR100_WEIGHTS, CIFAR100_EFFICIENTNET_LITE0_WEIGHTS, CIFAR100_EFFICIENTNET_LITE2_WEIGHTS
#                    ImageNet weights (unset: cache, then download)
#   OUT              where records and the log go (default gpu-records/)
#   PYTHON           an interpreter whose torch sees the GPU (default python3)
#   TRAIN_ARGS       more `cifar100 train` flags for every preset, e.g.
#                    "--set transfer.stage2_epochs=20 --set train.compile=true"
#   RUNS             where the run folders go (default runs/)
#   PHASE            all (default); nodata: only what needs no data set (the gpu tests,
#                    then benchmarks/gpu_throughput.py with and without torch.compile),
#                    for a first call while the data set is still on its way; records:
#                    only the presets
#   DEADLINE_S       seconds from the start by which everything must end (default 780:
#                    a 15-minute device session less its start); a preset that cannot
#                    get MIN_PRESET_S (default 60) before it is skipped and logged
#   PRESET_LIMIT_S   the most one preset may take (default 300); past it the run is stopped
#                    (SIGINT: state saved, resumable) and no record is written for it
#   SKIP_TESTS=1     no gpu tests; THROUGHPUT=0 no throughput rows
#   TESTS_LIMIT_S    the most the gpu tests may take (default 90; they took 43 s on an H200)
#   THROUGHPUT_LIMIT_S  the most benchmarks/gpu_throughput.py may take (default 180): it
#                    starts no row after two thirds of it (--budget-s; the rows left are
#                    listed as skipped) and is stopped at the limit, keeping every row it
#                    finished in gpu_throughput.json
#   THROUGHPUT_ARGS  more flags for it, e.g. "--levers compile-max-autotune" or
#                    "--presets mobilenetv2-finetune-gpu"
#   ENSEMBLE=0       no ensemble; otherwise, once two presets or more have their record,
#                    `cifar100 evaluate --select --tta` chooses an ensemble of them on the
#                    validation split and its record goes into $OUT as
#                    ensemble-selected-GPU.json (when $OUT has room for a file more;
#                    at most ENSEMBLE_LIMIT_S, default 120)
#   ALLOW_CPU=1      go on without a GPU (records named "cpu"): the script's own test
#
# The nodata phase takes at most TESTS_LIMIT_S + THROUGHPUT_LIMIT_S (and never passes
# DEADLINE_S). $OUT ends with at most 8 files: gpu-records.log, gpu_throughput.txt (the
# table), gpu_throughput.json (the same rows, with what each lever decides), one record
# per preset and the ensemble's; more presets than fit are refused before anything runs.
#
# For a device lent for 15 minutes that receives at most 64 MiB a call, in two calls made
# back to back (the machine goes back ~30 s after a call):
#   here:  bash ../shared/gpu/stage-cifar100-packed.sh   (-> .gpu-data/part-a, part-b, packer)
#   call 1, carrying part-a, pack-cifar100.py and the weights: park them outside the
#          checkout (say /root/p), then  PHASE=nodata bash scripts/gpu-records.sh
#          (at most 90 + 180 s: the gpu tests, then the throughput rows)
#   call 2, carrying part-b: park it beside part-a, then
#          PHASE=records CIFAR100_PACKED=/root/p CIFAR100_DATA=/root/c100 \
#          DEADLINE_S=480 bash scripts/gpu-records.sh
# Both calls together stay within 750 s of the 15 minutes, leaving the machine's start.
# with the weight variables pointing at the parked files, and $OUT under the tool's $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$SECONDS
python=${PYTHON:-python3}
phase=${PHASE:-all}
deadline=${DEADLINE_S:-780}
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

unpack_packed() {
    [[ -n ${CIFAR100_DATA:-} ]] || fail "CIFAR100_PACKED needs CIFAR100_DATA, the folder to unpack into"
    for file in part-a part-b pack-cifar100.py; do
        [[ -f $CIFAR100_PACKED/$file ]] || fail "$CIFAR100_PACKED/$file: missing"
    done
    cat "$CIFAR100_PACKED/part-a" "$CIFAR100_PACKED/part-b" > "$CIFAR100_PACKED/c100.xz"
    # The unpacker md5-checks every rebuilt file and exits non-zero on a difference.
    "$python" "$CIFAR100_PACKED/pack-cifar100.py" unpack "$CIFAR100_PACKED/c100.xz" "$CIFAR100_DATA" \
        >> "$log" 2>&1 || fail "$CIFAR100_PACKED: the parts do not rebuild CIFAR-100 (see $log)"
    rm -f "$CIFAR100_PACKED/c100.xz"
}

case $phase in all | nodata | records) ;; *) fail "PHASE=$phase: choose all, nodata or records" ;; esac
presets=("$@")
[[ ${#presets[@]} -gt 0 ]] || presets=(efficientnet-lite0-finetune-gpu efficientnet-lite2-finetune-gpu cnn-fast mobilenetv2-finetune-gpu resnet18-gpu)
# $OUT holds at most 8 files: the log, the throughput table and JSON, one record a preset.
files=1
[[ $phase == records || ${THROUGHPUT:-1} == 0 ]] || files=$((files + 2))
[[ $phase == nodata ]] || files=$((files + ${#presets[@]}))
(( files <= 8 )) || fail "${#presets[@]} presets: \$OUT would hold $files files, 8 at most (fewer presets, or PHASE=records)"
# The ensemble's record takes a ninth file's place only if there is one.
ensemble=0
if [[ $phase != nodata && ${ENSEMBLE:-1} != 0 && ${#presets[@]} -ge 2 ]]; then
    if (( files < 8 )); then
        ensemble=1 files=$((files + 1))
    else
        echo "gpu-records: no ensemble: \$OUT holds 8 files at most (fewer presets, or PHASE=records)" | tee -a "$log"
    fi
fi
if [[ $phase != nodata ]]; then
    [[ -z ${CIFAR100_PACKED:-} ]] || unpack_packed
    [[ -z ${CIFAR100_PARTS:-} ]] || unpack_parts
fi
gpu=$("$python" -c 'import torch; print(torch.cuda.get_device_name().split()[-1].lower()
      if torch.cuda.is_available() else "cpu")' | tr -c 'a-z0-9\n' '-')
[[ $gpu != cpu || -n ${ALLOW_CPU:-} ]] || fail "$python: its torch does not see a CUDA GPU"
# The commit exactly as each record will name it (None: no git here, -dirty: not committed).
commit=$("$python" -c 'from cifar100.runs.folders import git_commit; print(git_commit())')
echo "gpu-records: commit $commit, $(date -u '+%F %T UTC')" | tee -a "$log"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$log" || true

left() { echo $((deadline - (SECONDS - started))); }
# The seconds a step may take: its own cap, or what the deadline leaves if that is less.
capped() { local cap=$1 rest; rest=$(left); echo $((rest < cap ? rest : cap)); }

if [[ $phase != records && -z ${SKIP_TESTS:-} ]]; then
    limit=$(capped "${TESTS_LIMIT_S:-90}")
    if (( limit < 10 )); then
        echo "gpu-records: gpu tests SKIPPED: ${limit}s left before the deadline" | tee -a "$log"
    else
        # A failing test is logged, not fatal: the records still say what ran and how fast.
        timeout "$limit" "$python" -m pytest -m gpu -q -p no:cacheprovider 2>&1 | tee -a "$log" \
            || echo "gpu-records: gpu tests FAILED or stopped at ${limit}s (above)" | tee -a "$log"
    fi
fi
if [[ $phase != records && ${THROUGHPUT:-1} != 0 ]]; then
    limit=$(capped "${THROUGHPUT_LIMIT_S:-180}")
    if (( limit < 30 )); then
        echo "gpu-records: throughput SKIPPED: ${limit}s left before the deadline" | tee -a "$log"
    else
        # Every lever (eager, the torch.compile modes, memory format, BatchNorm precision)
        # for ResNet-18 and cnn-fast, quickest first; a third of the time is kept for the
        # row in flight (a first compile takes a minute or more).
        echo "== throughput (at most ${limit}s)" | tee -a "$log"
        # shellcheck disable=SC2086  # THROUGHPUT_ARGS is a list of flags: split on spaces
        timeout --kill-after=10 "$limit" "$python" benchmarks/gpu_throughput.py \
            --budget-s $((limit * 2 / 3)) --json "$out/gpu_throughput.json" ${THROUGHPUT_ARGS:-} \
            2>> "$log" | tee "$out/gpu_throughput.txt" \
            || echo "gpu-records: throughput FAILED or stopped at ${limit}s" | tee -a "$log"
        rm -f "$out/gpu_throughput.json.partial"  # a write cut off by the limit
    fi
fi
[[ $phase != nodata ]] || exit 0

data_flag=()
[[ -z ${CIFAR100_DATA:-} ]] || data_flag=(--data-dir "$CIFAR100_DATA")
runs=${RUNS:-runs}
mkdir -p "$runs"
status=0
recorded=()  # run folders whose record was written
for preset in "${presets[@]}"; do
    limit=$(( $(left) < ${PRESET_LIMIT_S:-300} ? $(left) : ${PRESET_LIMIT_S:-300} ))
    if (( limit < ${MIN_PRESET_S:-60} )); then
        echo "gpu-records: $preset SKIPPED: ${limit}s left before the deadline" | tee -a "$log"
        status=1
        continue
    fi
    # A new folder each time: a trained run is never overwritten.
    run="$runs/$preset-$gpu-$(date -u +%Y%m%d-%H%M%S)"
    echo "== $preset -> $run (at most ${limit}s)" | tee -a "$log"
    # A preset that fails is logged and the next one still runs (device time is scarce).
    # Past its limit it gets SIGINT: the loop saves its state (the run resumes with
    # `cifar100 train --resume`) and no record is written for it; KILL 30 s later if need be.
    # shellcheck disable=SC2086  # TRAIN_ARGS is a list of flags: split on spaces
    timeout --signal=INT --kill-after=30 "$limit" "$python" -m cifar100 train \
        --preset "$preset" "${data_flag[@]}" ${TRAIN_ARGS:-} --run-dir "$run" --json 2>&1 \
        | tee -a "$log" || echo "gpu-records: $preset stopped early (above)" | tee -a "$log"
    if "$python" -m cifar100 compare --record "$run" --to "$out/$preset-$gpu.json" 2>&1 \
        | tee -a "$log"; then
        recorded+=("$run")
        continue
    fi
    echo "gpu-records: $preset FAILED (above)" | tee -a "$log"
    status=1
done
(( ensemble && ${#recorded[@]} >= 2 )) || exit $status

# The best ensemble of this machine's runs: members chosen on the validation split they
# share (`cifar100 evaluate --select`, flip TTA), never on the test set.
limit=$(capped "${ENSEMBLE_LIMIT_S:-120}")
if (( limit < 20 )); then
    echo "gpu-records: ensemble SKIPPED: ${limit}s left before the deadline" | tee -a "$log"
    exit 1
fi
report="$runs/ensemble-$gpu-$(date -u +%Y%m%d-%H%M%S)"
echo "== ensemble of ${#recorded[@]} runs -> $report (at most ${limit}s)" | tee -a "$log"
if timeout --kill-after=10 "$limit" "$python" -m cifar100 evaluate "${recorded[@]}" --select \
    --tta "${data_flag[@]}" --out "$report" --json 2>&1 | tee -a "$log" \
    && "$python" -m cifar100 compare --record "$report" --to "$out/ensemble-selected-$gpu.json" \
        2>&1 | tee -a "$log"; then
    exit $status
fi
echo "gpu-records: ensemble FAILED (above)" | tee -a "$log"
exit 1
