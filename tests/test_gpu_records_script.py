"""scripts/gpu-records.sh: parts checked, unpacked and verified (the four-part tar and the
two-part packed form), a clear stop where no GPU is visible, and (ALLOW_CPU, fake data) the
training half: a record per preset, a failing preset logged without stopping the next,
presets that the deadline leaves no time for skipped and logged, the phase that needs no
data."""

import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu-records.sh"


@pytest.fixture(scope="module")
def parts(shared_dir, tmp_path_factory) -> Path:
    """The real data set cut into parts by ../shared's own staging script."""
    stage = shared_dir / "gpu" / "stage-cifar100.sh"
    if not stage.exists():
        pytest.skip(f"{stage} is absent")
    root = tmp_path_factory.mktemp("staging")
    (root / ".git" / "info").mkdir(parents=True)
    subprocess.run(["bash", str(stage)], cwd=root, check=True, capture_output=True)
    return root / ".gpu-data"


def run_script(
    parts: Path | None, data: Path, out: Path, *presets: str, **env: str
) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "CIFAR100_DATA": str(data),
        "OUT": str(out),
        "PYTHON": sys.executable,
        "PYTHONPATH": str(ROOT / "src"),
        "CUDA_VISIBLE_DEVICES": "",  # whatever the machine, no GPU is visible here
        **({"CIFAR100_PARTS": str(parts)} if parts else {}),
        **env,
    }
    return subprocess.run(["bash", str(SCRIPT), *presets], env=env, capture_output=True, text=True)


def test_parts_are_rebuilt_and_a_missing_gpu_stops_cleanly(parts, real_data_dir, tmp_path):
    result = run_script(parts, tmp_path / "data", tmp_path / "out")
    assert result.returncode == 1
    assert "does not see a CUDA GPU" in result.stderr
    assert "Traceback" not in result.stderr
    rebuilt = tmp_path / "data" / "cifar-100-python"
    for name in ("train", "test", "meta"):  # the script checked their md5 before stopping
        original = real_data_dir / "cifar-100-python" / name
        assert (rebuilt / name).read_bytes() == original.read_bytes()
    assert [path.name for path in (tmp_path / "out").iterdir()] == ["gpu-records.log"]


def test_a_damaged_part_is_named_and_nothing_is_unpacked(parts, tmp_path):
    damaged = tmp_path / "parts"
    damaged.mkdir()
    for part in parts.iterdir():
        data = part.read_bytes()
        if part.name == "part-01":
            data = data[:-1000]  # a transfer cut short
        (damaged / part.name).write_bytes(data)
    result = run_script(damaged, tmp_path / "data", tmp_path / "out")
    assert result.returncode == 1
    assert f"{damaged}: a part is missing or damaged" in result.stderr
    assert not (tmp_path / "data").exists()


def test_each_preset_gets_a_record_a_failure_does_not_stop_the_next_and_they_ensemble(
    fake_data_dir, tmp_path
):
    tiny = "--epochs 1 --set model.widths=[8,16,32,32] --set train.batch_size=100"
    result = run_script(
        None,
        fake_data_dir,
        tmp_path / "out",
        "no-such-preset",
        "quick",
        "cnn-speed",
        ALLOW_CPU="1",
        SKIP_TESTS="1",
        RUNS=str(tmp_path / "runs"),
        TRAIN_ARGS=tiny,
    )
    log = (tmp_path / "out" / "gpu-records.log").read_text()
    assert result.returncode == 1, log
    assert "gpu-records: no-such-preset FAILED" in log
    record = json.loads((tmp_path / "out" / "quick-cpu.json").read_text())
    assert record["model"] == "cnn-fast" and 0 <= record["test_top1"] <= 1
    assert record["config"]["train"]["epochs"] == 1  # TRAIN_ARGS reached the run
    runs = sorted(path.name for path in (tmp_path / "runs").iterdir())
    assert [name.split("-cpu-")[0] for name in runs] == ["cnn-speed", "ensemble", "quick"]
    assert (tmp_path / "runs" / runs[2] / "config.yaml").exists()
    # The two recorded runs, chosen among on validation: the ensemble's record beside them
    # (one run's record again, should the selection keep only one of two tiny runs).
    ensemble = json.loads((tmp_path / "out" / "ensemble-selected-cpu.json").read_text())
    assert 0 <= ensemble["test_top1"] <= 1 and ensemble["tta_flip"] is True
    assert "--select" in ensemble["command"] and str(tmp_path / "runs") in ensemble["command"]


@pytest.fixture
def bytes_keyed(fake_data_dir, tmp_path) -> Path:
    """The fake data set with bytes keys, as the real pickles (written by Python 2) have
    them and the packer expects."""
    folder = tmp_path / "bytes-keyed" / "cifar-100-python"
    folder.mkdir(parents=True)
    for name in ("train", "test", "meta"):
        with open(fake_data_dir / "cifar-100-python" / name, "rb") as f:
            entry = pickle.load(f, encoding="bytes")
        keyed = {k.encode() if isinstance(k, str) else k: v for k, v in entry.items()}
        (folder / name).write_bytes(pickle.dumps(keyed, protocol=4))
    return folder.parent


@pytest.fixture
def packed(shared_dir, bytes_keyed, tmp_path) -> Path:
    """A small data set packed by ../shared's packer and cut into the two parts its
    staging script makes, with the unpacker beside them."""
    packer = shared_dir / "gpu" / "pack-cifar100.py"
    folder = tmp_path / "packed"
    folder.mkdir()
    subprocess.run(
        [sys.executable, str(packer), "pack", str(bytes_keyed), str(folder / "c100.xz")],
        check=True,
        capture_output=True,
    )
    data = (folder / "c100.xz").read_bytes()
    (folder / "part-a").write_bytes(data[: len(data) // 2])
    (folder / "part-b").write_bytes(data[len(data) // 2 :])
    (folder / "c100.xz").unlink()
    (folder / "pack-cifar100.py").write_bytes(packer.read_bytes())
    return folder


def test_two_packed_parts_are_rebuilt_byte_for_byte(packed, bytes_keyed, tmp_path):
    result = run_script(None, tmp_path / "data", tmp_path / "out", CIFAR100_PACKED=str(packed))
    assert result.returncode == 1 and "does not see a CUDA GPU" in result.stderr
    for name in ("train", "test", "meta"):
        original = bytes_keyed / "cifar-100-python" / name
        assert (tmp_path / "data" / "cifar-100-python" / name).read_bytes() == original.read_bytes()


def test_a_damaged_packed_part_is_named(packed, tmp_path):
    part = packed / "part-b"
    part.write_bytes(part.read_bytes()[:-100])  # a transfer cut short
    result = run_script(None, tmp_path / "data", tmp_path / "out", CIFAR100_PACKED=str(packed))
    assert result.returncode == 1
    assert f"{packed}: the parts do not rebuild CIFAR-100" in result.stderr
    (part).unlink()
    result = run_script(None, tmp_path / "data", tmp_path / "out", CIFAR100_PACKED=str(packed))
    assert f"{part}: missing" in result.stderr and "Traceback" not in result.stderr


def test_the_deadline_skips_presets_it_leaves_no_time_for(fake_data_dir, tmp_path):
    result = run_script(
        None,
        fake_data_dir,
        tmp_path / "out",
        "quick",
        "cnn-fast",
        ALLOW_CPU="1",
        SKIP_TESTS="1",
        THROUGHPUT="0",
        DEADLINE_S="30",
        MIN_PRESET_S="60",
        RUNS=str(tmp_path / "runs"),
    )
    log = (tmp_path / "out" / "gpu-records.log").read_text()
    assert result.returncode == 1, log
    for preset in ("quick", "cnn-fast"):
        assert f"gpu-records: {preset} SKIPPED" in log
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["gpu-records.log"]


def test_the_no_data_phase_trains_nothing(tmp_path):
    result = run_script(
        None,
        tmp_path / "no-data-yet",
        tmp_path / "out",
        ALLOW_CPU="1",
        SKIP_TESTS="1",
        THROUGHPUT="0",
        PHASE="nodata",
        RUNS=str(tmp_path / "runs"),
    )
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "runs").exists()
    bad = run_script(None, tmp_path / "d", tmp_path / "out", PHASE="later", ALLOW_CPU="1")
    assert bad.returncode == 1 and "PHASE=later: choose all, nodata or records" in bad.stderr


def test_the_no_data_phase_runs_the_gpu_tests_then_the_throughput_rows(tmp_path):
    result = run_script(
        None,
        tmp_path / "no-data-yet",
        tmp_path / "out",
        ALLOW_CPU="1",
        PHASE="nodata",
        THROUGHPUT_ARGS="--smoke --presets cnn-fast --levers eager compile",
        TESTS_LIMIT_S="400",  # generous: two busy cores are slow, and only the order is checked
        THROUGHPUT_LIMIT_S="400",
    )
    log = (tmp_path / "out" / "gpu-records.log").read_text()
    assert result.returncode == 0, log
    assert "deselected" in log  # pytest -m gpu ran (and found no CUDA to test)
    assert "== throughput (at most 400s)" in log
    names = sorted(path.name for path in (tmp_path / "out").iterdir())
    assert names == ["gpu-records.log", "gpu_throughput.json", "gpu_throughput.txt"]
    rows = json.loads((tmp_path / "out" / "gpu_throughput.json").read_text())["rows"]
    assert [(row["lever"], row["preset"]) for row in rows] == [
        ("eager", "cnn-fast"),
        ("compile", "cnn-fast"),
    ]
    assert all(row["train_img_s"] > 0 for row in rows)
    assert "compile" in (tmp_path / "out" / "gpu_throughput.txt").read_text()


def test_the_throughput_rows_end_by_the_deadline(tmp_path):
    # ResNet-18 steps of 128 images take seconds each on a CPU: the 12 rows need far more
    # than the deadline even on a quiet machine (toy batches of 8 fit in it).
    slow_rows = "--smoke --batch-size 128"
    common = dict(ALLOW_CPU="1", PHASE="nodata", SKIP_TESTS="1", THROUGHPUT_ARGS=slow_rows)
    started = time.monotonic()
    result = run_script(None, tmp_path / "d", tmp_path / "out", DEADLINE_S="40", **common)
    took = time.monotonic() - started
    log = (tmp_path / "out" / "gpu-records.log").read_text()
    assert result.returncode == 0, log
    assert took < 40 + 10 + 5, log  # the deadline, timeout's grace, the script's start
    # Cut short by --budget-s (rows skipped) or by the limit (rows missing, or on a busy
    # machine no JSON yet): never all 12 rows, never a half-written file.
    names = {path.name for path in (tmp_path / "out").iterdir()}
    assert names <= {"gpu-records.log", "gpu_throughput.txt", "gpu_throughput.json"}, names
    if "gpu_throughput.json" in names:
        report = json.loads((tmp_path / "out" / "gpu_throughput.json").read_text())
        assert len([row for row in report["rows"] if "train_img_s" in row]) < 12
    late = run_script(None, tmp_path / "d", tmp_path / "late", DEADLINE_S="20", **common)
    assert late.returncode == 0
    assert "throughput SKIPPED: " in (tmp_path / "late" / "gpu-records.log").read_text()


def test_more_presets_than_out_can_hold_are_refused_before_anything_runs(tmp_path):
    presets = ["quick", "cnn-fast", "resnet18-gpu", "a", "b", "c"]
    result = run_script(
        None, tmp_path / "d", tmp_path / "out", *presets, ALLOW_CPU="1", RUNS=str(tmp_path / "r")
    )
    assert result.returncode == 1
    assert "6 presets: $OUT would hold 9 files, 8 at most" in result.stderr
    assert not (tmp_path / "r").exists()
