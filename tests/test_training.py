"""The engine: models, one-batch overfitting, checkpoints, exact resume, NaN, CLI smoke."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cifar100.config.schema import AugmentConfig, ModelConfig, OptimConfig
from cifar100.data.augment import one_hot
from cifar100.data.batches import ImageBatches
from cifar100.data.cifar import Split
from cifar100.data.preprocess import Preprocess
from cifar100.models import REGISTRY, build_model, count_parameters, model_spec
from cifar100.runtime.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from cifar100.training.engine import (
    EpochState,
    StepContext,
    TrainingDiverged,
    train_one_epoch,
    train_step,
)
from cifar100.training.optim import make_optimizer

TINY = [
    "--set",
    "model.widths=8,16,32,32",
    "--set",
    "train.batch_size=50",
    "--set",
    "train.eval_batch_size=100",
]


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_model_maps_images_to_100_logits(name):
    spec = model_spec(name)
    model = build_model(ModelConfig(name=name)).eval()
    images = torch.randn(2, 3, spec.input_size, spec.input_size)
    assert model(images).shape == (2, 100)
    assert count_parameters(model) > 10_000


@pytest.mark.parametrize("name", ["cnn-seed", "cnn-fast"])
def test_one_batch_can_be_overfitted(name):
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name, dropout=0.0))
    if name == "cnn-seed":  # its stage dropouts are part of the seed design; switch them off
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
    images, labels = torch.randn(16, 3, 32, 32), torch.arange(16) % 100
    optimizer = make_optimizer(model.parameters(), OptimConfig(optimizer="adam", lr=3e-3))
    ctx = StepContext(
        optimizer=optimizer, scheduler=None, num_classes=100, label_smoothing=0.0, augment=None
    )
    for _ in range(60):
        loss, _ = train_step(model.train(), images, labels, ctx, torch.Generator())
    assert loss < 0.05
    assert (model.eval()(images).argmax(1) == labels).all()


def test_nan_loss_stops_with_a_clear_error():
    model = build_model(ModelConfig(name="cnn-seed"))
    with torch.no_grad():
        model.classifier[1].bias.fill_(float("nan"))
    optimizer = make_optimizer(model.parameters(), OptimConfig())
    ctx = StepContext(
        optimizer=optimizer,
        scheduler=None,
        num_classes=100,
        label_smoothing=0.0,
        augment=AugmentConfig(),
    )
    split = Split(torch.zeros(8, 3, 32, 32, dtype=torch.uint8), torch.arange(8), torch.arange(8))
    batches = ImageBatches(split, Preprocess(32, (0.5,) * 3, (0.25,) * 3), torch.device("cpu"))
    # The loss is read (and checked) at sync steps; on CPU that is every step by default.
    with pytest.raises(TrainingDiverged, match="nan"):
        train_one_epoch(
            model,
            batches,
            ctx,
            batch_size=4,
            order=torch.arange(8),
            generator=torch.Generator(),
            state=EpochState(),
            on_pause=lambda state: False,
        )


def test_one_hot_smoothing_sums_to_one():
    targets = one_hot(torch.tensor([3, 7]), 100, smoothing=0.1)
    assert torch.allclose(targets.sum(1), torch.ones(2))
    assert targets[0, 3] == pytest.approx(0.9 + 0.001)


def test_checkpoint_round_trip_and_atomic_failure(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save_checkpoint({"epoch": 1, "weights": torch.arange(3)}, path)
    assert load_checkpoint(path)["epoch"] == 1

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointError, match="No space left"):
        save_checkpoint({"epoch": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1  # the last good one survives
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temp files left


def test_corrupt_checkpoint_is_a_one_line_error(tmp_path):
    path = tmp_path / "bad.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="bad.pt: unreadable"):
        load_checkpoint(path)


def _train_cmd(data_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "cifar100",
        "train",
        "--preset",
        "quick",
        "--epochs",
        "3",
        "--data-dir",
        str(data_dir),
        "--run-dir",
        str(run_dir),
        "--json",
        *TINY,
        *extra,
    ]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _final_state(run_dir: Path) -> tuple[dict, dict]:
    results = json.loads((run_dir / "results.json").read_text())
    results.pop("run_dir")
    for timing in ("train_minutes", "train_seconds", "wall_seconds", "time_to_val"):
        results.pop(timing)
    results.pop("process")  # CPU seconds and page faults: timing, like the minutes
    return results, load_checkpoint(run_dir / "checkpoints" / "last.pt")["model"]


@pytest.fixture(scope="module")
def uninterrupted(fake_data_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "straight"
    subprocess.run(_train_cmd(fake_data_dir, run_dir), check=True, env=_env(), capture_output=True)
    return _final_state(run_dir)


def _assert_same_run(a, b):
    assert a[0] == b[0]  # every metric, to the last digit
    assert a[1].keys() == b[1].keys()
    for key in a[1]:
        assert torch.equal(a[1][key], b[1][key]), key


@pytest.mark.parametrize("epochs_done", [0, 1])
def test_sigkill_then_resume_equals_uninterrupted(
    fake_data_dir, tmp_path, uninterrupted, epochs_done, assert_tensorboard_mirrors_metrics
):
    """Checkpoints every step (checkpoint_minutes=0), so the kill often lands mid-write.

    The kill waits on a condition, not a clock: the third checkpoint written once
    ``epochs_done`` epochs are recorded, mid-epoch. A kill timed in seconds can land after
    the run finished on a busy machine, and then a resume that restores no mid-epoch step
    or RNG state passes: it only re-scores the finished run.
    """
    run_dir = tmp_path / "killed"
    cmd = _train_cmd(fake_data_dir, run_dir, "--set", "train.checkpoint_minutes=0")
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last, versions = run_dir / "checkpoints" / "last.pt", set()
    deadline = time.monotonic() + 120
    while proc.poll() is None and len(versions) < 3 and time.monotonic() < deadline:
        if _metric_rows(run_dir) >= epochs_done:
            with contextlib.suppress(FileNotFoundError):  # not written yet
                stat = last.stat()
                versions.add((stat.st_ino, stat.st_mtime_ns))  # each save replaces the file
        time.sleep(0.002)
    assert proc.poll() is None, "the run ended before the kill"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # The kill landed mid-run: in the epoch after the ones recorded, before any results.
    assert not (run_dir / "results.json").exists()
    assert _metric_rows(run_dir) in (epochs_done, epochs_done + 1)
    resumed = subprocess.run(
        [sys.executable, "-m", "cifar100", "train", "--resume", str(run_dir), "--json"],
        env=_env(),
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stderr
    _assert_same_run(_final_state(run_dir), uninterrupted)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert_tensorboard_mirrors_metrics(run_dir)  # the same curves, no epoch twice


def _metric_rows(run_dir: Path) -> int:
    metrics = run_dir / "metrics.jsonl"
    return len(metrics.read_text().splitlines()) if metrics.exists() else 0


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_stop_signal_saves_and_resumes_exactly(
    fake_data_dir, tmp_path, uninterrupted, signum, code
):
    run_dir = tmp_path / "interrupted"
    proc = subprocess.Popen(
        _train_cmd(fake_data_dir, run_dir),
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not (run_dir / "metrics.jsonl").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before the signal could be sent"
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code, stderr
    last_line = stderr.strip().splitlines()[-1]
    assert last_line.startswith(f"cifar100: stopped by {signal.Signals(signum).name}")
    assert f"resume with: cifar100 train --resume {run_dir}" in last_line
    assert not (run_dir / "results.json").exists()  # the signal landed before the end
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    # Stopped mid-epoch (the signal came after epoch 1's row): the step is what resumes.
    assert state["epoch_state"] is not None and state["epoch_state"]["step"] >= 1
    assert state["epoch"] in (1, 2)
    subprocess.run(
        [sys.executable, "-m", "cifar100", "train", "--resume", str(run_dir)],
        env=_env(),
        check=True,
        capture_output=True,
    )
    _assert_same_run(_final_state(run_dir), uninterrupted)


def test_diverging_run_exits_with_one_line_and_keeps_checkpoint(fake_data_dir, tmp_path):
    """Epoch 1 trains well; in epoch 2 the learning rate explodes (1e30 written into the
    checkpoint's optimizer state). The run stops with one line, and the checkpoints,
    metrics and results of epoch 1 stay exactly as they were."""
    run_dir = tmp_path / "nan"
    cmd = _train_cmd(fake_data_dir, run_dir, "--epochs", "1", "--set", "optim.schedule=plateau")
    subprocess.run(cmd, env=_env(), check=True, capture_output=True)
    last = run_dir / "checkpoints" / "last.pt"
    state = load_checkpoint(last)
    assert state["epoch"] == 1 and all(
        torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point()
    )  # a good checkpoint
    for group in state["optimizer"]["param_groups"]:
        group["lr"] = 1e30
    save_checkpoint(state, last)
    kept = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    result = subprocess.run(
        [sys.executable, "-m", "cifar100", "train", "--resume", str(run_dir), "--epochs", "2"],
        env=_env(),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("cifar100: error:") and "loss became" in last_line
    assert "Traceback" not in result.stderr
    after = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    after = {p: v for p, v in after.items() if p.name not in ("run.json", "config.yaml")}
    assert after == {p: v for p, v in kept.items() if p.name not in ("run.json", "config.yaml")}


def test_real_data_one_epoch_smoke_writes_every_file(real_data_dir, tmp_path):
    run_dir = tmp_path / "smoke"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "cifar100",
            "train",
            "--model",
            "cnn-seed",
            "--epochs",
            "1",
            "--train-subset",
            "1000",
            "--data-dir",
            str(real_data_dir),
            "--run-dir",
            str(run_dir),
            "--json",
        ],
        env=_env(),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    results = json.loads(result.stdout)
    assert results["train_images"] == 1000
    assert 0.0 <= results["test_top1"] <= results["test_top5"] <= 1.0
    for name in [
        "config.yaml",
        "run.json",
        "metrics.jsonl",
        "curves.png",
        "results.json",
        "checkpoints/best.pt",
        "checkpoints/last.pt",
    ]:
        assert (run_dir / name).is_file(), name
    run_info = json.loads((run_dir / "run.json").read_text())
    assert run_info["hardware"]["cpu_count"] and "commit" in run_info
    best = load_checkpoint(run_dir / "checkpoints" / "best.pt")
    assert len(best["class_names"]) == 100 and best["class_names"][0] == "apple"
