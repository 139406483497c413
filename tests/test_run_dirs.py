"""Run folders: never clobbered, locked while written, resumed (and extended) on request."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cifar100.cli import main
from cifar100.runtime.checkpoint import load_checkpoint

TINY = [
    "--preset",
    "quick",
    "--set",
    "model.widths=8,16,32,32",
    "--set",
    "train.batch_size=50",
    "--set",
    "train.eval_batch_size=100",
]


def _train(data_dir: Path, run_dir: Path, *extra: str) -> int:
    return main(
        [
            "train",
            *TINY,
            "--epochs",
            "1",
            "--data-dir",
            str(data_dir),
            "--run-dir",
            str(run_dir),
            *extra,
        ]
    )


def _snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cifar100: error: "), err
    return err[0]


@pytest.fixture
def finished(fake_data_dir, tmp_path) -> Path:
    run_dir = tmp_path / "run"
    assert _train(fake_data_dir, run_dir) == 0
    return run_dir


def test_a_finished_run_is_never_replaced_by_accident(finished, fake_data_dir, capsys):
    before = _snapshot(finished)
    assert before and "checkpoints/best.pt" in before  # a precondition: there is a run
    capsys.readouterr()
    assert _train(fake_data_dir, finished, "--seed", "1") == 1
    line = _one_error_line(capsys)
    assert "holds a finished run (test top-1" in line
    assert f"--resume {finished}" in line and "--overwrite" in line
    assert _snapshot(finished) == before  # not one byte changed


def test_overwrite_replaces_the_run_files_and_nothing_else(finished, fake_data_dir):
    (finished / "notes.txt").write_text("mine\n")
    (finished / "report").mkdir()
    (finished / "report" / "report.json").write_text("{}")  # a stale report of the old run
    (finished / "metrics.jsonl").write_text('{"stage": "main", "epoch": 7}\n' * 7)
    assert _train(fake_data_dir, finished, "--overwrite") == 0
    assert [r["epoch"] for r in _rows(finished)] == [1]  # a new run, not appended to
    assert not (finished / "report").exists()
    assert (finished / "notes.txt").read_text() == "mine\n"
    assert not (finished / ".lock").exists()


def test_a_folder_that_holds_no_run_is_refused_even_with_overwrite(fake_data_dir, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "cat.jpg").write_bytes(b"\xff\xd8 a cat")
    assert _train(fake_data_dir, folder, "--overwrite") == 1
    assert "holds no run" in _one_error_line(capsys)
    assert sorted(p.name for p in folder.iterdir()) == ["cat.jpg"]


def test_a_failed_start_leaves_no_folder(tmp_path, capsys):
    run_dir = tmp_path / "new" / "run"
    assert _train(tmp_path / "no-data", run_dir) == 1
    assert "cifar-100-python" in _one_error_line(capsys)
    assert not run_dir.exists()


def _hold_lock(run_dir: Path) -> subprocess.Popen:
    """Another live process holding the run's lock, as a training process does."""
    code = (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(run_dir / '.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "os.write(fd, f'{os.getpid()}@host'.encode())\n"
        "print('locked', flush=True)\n"
        "time.sleep(120)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_overwrite_never_touches_a_run_another_process_writes(finished, fake_data_dir, capsys):
    before = _snapshot(finished)
    holder = _hold_lock(finished)
    try:
        capsys.readouterr()
        assert _train(fake_data_dir, finished, "--overwrite") == 1
        line = _one_error_line(capsys)
        assert f"another process ({holder.pid}@host) is writing this run" in line
        assert main(["train", "--resume", str(finished), "--epochs", "2"]) == 1
        assert "another process" in _one_error_line(capsys)
    finally:
        holder.kill()
        holder.wait()
    after = _snapshot(finished)
    after.pop(".lock", None)  # the holder's, left as a killed process leaves it
    assert after == before


def test_a_stale_lock_is_taken_over(finished, fake_data_dir, capsys):
    """A lock file left by a killed process (its pid is gone) does not block the run."""
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    ).stdout.strip()
    (finished / ".lock").write_text(f"{dead}@{socket.gethostname()}\n")
    capsys.readouterr()
    assert main(["train", "--resume", str(finished), "--epochs", "2"]) == 0
    assert f"was left by process {dead}@" in capsys.readouterr().err
    assert [r["epoch"] for r in _rows(finished)] == [1, 2]
    assert not (finished / ".lock").exists()


def test_stale_lock_by_pid_without_flock(finished, fake_data_dir, monkeypatch, capsys):
    """Where flock is missing (some network file systems) the pid alone decides."""

    from cifar100.runs import lock

    monkeypatch.setattr(lock, "fcntl", None)
    (finished / ".lock").write_text(f"{os.getppid()}@{socket.gethostname()}\n")  # alive
    capsys.readouterr()
    assert _train(fake_data_dir, finished, "--overwrite") == 1
    assert "another process" in _one_error_line(capsys)
    (finished / ".lock").write_text(f"999999999@{socket.gethostname()}\n")  # no such pid
    assert _train(fake_data_dir, finished, "--overwrite") == 0


def test_two_processes_on_one_folder_exactly_one_proceeds(fake_data_dir, tmp_path):
    run_dir = tmp_path / "race"
    cmd = [
        sys.executable,
        "-m",
        "cifar100",
        "train",
        *TINY,
        "--epochs",
        "2",
        "--data-dir",
        str(fake_data_dir),
        "--run-dir",
        str(run_dir),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 1], results
    loser = next(err for code, err in results if code == 1).strip().splitlines()
    assert len(loser) == 1 and loser[0].startswith("cifar100: error:")
    assert "another process" in loser[0] or "holds a finished run" in loser[0]
    assert [r["epoch"] for r in _rows(run_dir)] == [1, 2]  # one run's rows, once each


def test_resume_extends_a_finished_run(finished, capsys):
    assert main(["train", "--resume", str(finished), "--epochs", "3", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["epoch"] for r in _rows(finished)] == [1, 2, 3]
    assert load_checkpoint(finished / "checkpoints" / "last.pt")["epoch"] == 3
    assert yaml.safe_load((finished / "config.yaml").read_text())["train"]["epochs"] == 3
    info = json.loads((finished / "run.json").read_text())
    assert info["resumed"][0]["command"][-3:] == ["--epochs", "3", "--json"]
    assert results["best_epoch"] >= 1 and results["split_seed"] == 0
    assert main(["train", "--resume", str(finished), "--epochs", "2"]) == 1
    assert "has trained 3 epochs already; --epochs must be at least 3" in _one_error_line(capsys)


def test_resume_refuses_flags_it_would_drop(finished, capsys):
    before = _snapshot(finished)
    for flags, named in (
        (["--set", "optim.lr=1"], "--set"),
        (["--seed", "3"], "--seed"),
        (["--model", "cnn-seed", "--overwrite"], "--model, --overwrite"),
        (["--run-dir", "elsewhere"], "--run-dir"),
    ):
        assert main(["train", "--resume", str(finished), *flags]) == 1
        line = _one_error_line(capsys)
        assert f"cannot take {named}" in line and "--epochs, --device, --data-dir" in line
    assert _snapshot(finished) == before


def test_resume_keeps_the_device_type(finished, capsys):
    info = json.loads((finished / "run.json").read_text())
    assert main(["train", "--resume", str(finished), "--device", "cpu"]) == 0
    info["hardware"]["device"] = "cuda:0"  # as if trained on a GPU
    (finished / "run.json").write_text(json.dumps(info))
    capsys.readouterr()
    assert main(["train", "--resume", str(finished), "--device", "cpu"]) == 1
    assert "was trained on cuda:0" in _one_error_line(capsys)


def test_split_seed_is_apart_from_the_training_seed(fake_data_dir, tmp_path):
    """Two seeds of one recipe validate on the same images; the results say which."""
    runs = {seed: tmp_path / f"seed{seed}" for seed in (0, 1)}
    for seed, run_dir in runs.items():
        assert _train(fake_data_dir, run_dir, "--seed", str(seed)) == 0
    results = {s: json.loads((d / "results.json").read_text()) for s, d in runs.items()}
    assert results[0]["split_seed"] == results[1]["split_seed"] == 0
    weights = [load_checkpoint(d / "checkpoints" / "last.pt")["model"] for d in runs.values()]
    assert any((weights[0][k] != weights[1][k]).any() for k in weights[0])  # seeds differ
    from cifar100.data.cifar import load_cifar100, make_splits

    dataset = load_cifar100(fake_data_dir)
    same = make_splits(dataset, 0.2, 0).val_index
    assert not (same == make_splits(dataset, 0.2, 1).val_index).all()  # a seed moves it
    other = tmp_path / "split3"
    assert _train(fake_data_dir, other, "--set", "data.split_seed=3") == 0
    assert json.loads((other / "results.json").read_text())["split_seed"] == 3


def test_lock_holder_is_written_and_removed(tmp_path):
    from cifar100.runs.lock import locked

    run_dir = tmp_path / "run"
    with locked(run_dir):
        owner = (run_dir / ".lock").read_text().strip()
        assert owner == f"{os.getpid()}@{socket.gethostname()}"
        fd = os.open(run_dir / ".lock", os.O_RDWR)
        with pytest.raises(BlockingIOError):  # a real kernel lock, not only a file
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.close(fd)
    assert not run_dir.exists()  # created here, left empty: removed again
