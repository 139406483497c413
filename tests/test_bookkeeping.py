"""The loop's bookkeeping goes by the clock, not by the epoch: many short epochs write
``last.pt``, ``best.pt`` and ``curves.png`` a bounded number of times, and a run stopped
between two timed saves still saves at the stop and resumes to the last digit."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
import torch

from cifar100.config.schema import layered_config
from cifar100.runtime import stopping
from cifar100.runtime.checkpoint import load_checkpoint
from cifar100.training import loop
from cifar100.training.engine import TrainingInterrupted
from cifar100.training.train import train

TIMINGS = ("train_minutes", "train_seconds", "wall_seconds", "time_to_val", "process", "run_dir")


def _config(data_dir: Path, epochs: int, **train_settings):
    return layered_config(
        "quick",
        overrides={
            "model": {"widths": [8, 16, 32, 32]},
            "data": {"data_dir": str(data_dir), "train_subset": 100},
            "train": {"epochs": epochs, "batch_size": 50, "eval_batch_size": 200, **train_settings},
        },
    )


class Writes:
    """Every file the loop saves (by name) and every time it draws the curves."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.saved: list[str] = []
        self.plots = 0
        save, plot = loop.save_checkpoint, loop.plot_curves

        def saving(state, path):
            self.saved.append(Path(path).name)
            return save(state, path)

        def plotting(run_dir):
            self.plots += 1
            return plot(run_dir)

        monkeypatch.setattr(loop, "save_checkpoint", saving)
        monkeypatch.setattr(loop, "plot_curves", plotting)


def _results(run_dir: Path) -> dict:
    results = json.loads((run_dir / "results.json").read_text())
    return {k: v for k, v in results.items() if k not in TIMINGS}


def test_many_short_epochs_write_checkpoints_and_curves_a_bounded_number_of_times(
    fake_data_dir, tmp_path, monkeypatch
):
    """12 epochs of 2 steps with the default checkpoint_minutes: last.pt at most once per
    interval plus the stage's end, best.pt only with it, the curves once a minute plus
    the end; and what the end wrote is the finished run."""
    writes = Writes(monkeypatch)
    config = _config(fake_data_dir, epochs=12)
    started = time.monotonic()
    results = train(config, tmp_path / "run")
    seconds = time.monotonic() - started
    interval = config.train.checkpoint_minutes * 60
    assert interval >= 60  # the default: minutes, not epochs
    assert 1 <= writes.saved.count("last.pt") <= 1 + seconds // interval
    assert 1 <= writes.saved.count("best.pt") <= writes.saved.count("last.pt")
    assert 1 <= writes.plots <= 1 + seconds // loop.PLOT_EVERY_S
    last = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    best = load_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt")
    assert last["epoch"] == 12 and last["epoch_state"] is None
    assert best["epoch"] == results["best_epoch"] and best["val"]["top1"] == results["val_top1"]
    rows = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 12 and (tmp_path / "run" / "curves.png").is_file()


def test_checkpoint_minutes_zero_saves_every_epoch(fake_data_dir, tmp_path, monkeypatch):
    """The interval is the knob: 0 writes last.pt at every epoch end (and sync step)."""
    writes = Writes(monkeypatch)
    train(_config(fake_data_dir, epochs=3, checkpoint_minutes=0), tmp_path / "run")
    assert writes.saved.count("last.pt") >= 3 * 2  # 2 sync steps an epoch on a CPU


def test_a_stop_between_timed_saves_saves_and_resumes_exactly(fake_data_dir, tmp_path):
    """A stop asked for after epoch 3 (no timed save yet) saves last.pt and the best model
    kept in memory at the next step; the resumed run equals an uninterrupted one."""
    config = _config(fake_data_dir, epochs=5)
    train(config, tmp_path / "straight")

    def stop_after_epoch_3(row: dict) -> None:
        if row["epoch"] == 3:
            stopping._state["signum"] = signal.SIGTERM  # as the deferred handler records it

    stopped = tmp_path / "stopped"
    try:
        with pytest.raises(TrainingInterrupted, match="stopped at step 1 of 2"):
            train(config, stopped, on_epoch=stop_after_epoch_3)
    finally:
        stopping.reset()
    last = load_checkpoint(stopped / "checkpoints" / "last.pt")
    best = load_checkpoint(stopped / "checkpoints" / "best.pt")
    assert last["epoch"] == 3 and last["epoch_state"]["step"] == 1  # mid-epoch 4
    assert best["epoch"] <= 3 and best["val"]["top1"] == last["best_top1"]  # never behind
    assert (stopped / "curves.png").is_file() and not (stopped / "results.json").exists()

    resumed = train(config, stopped, resume=True)
    assert _results(stopped) == _results(tmp_path / "straight")
    a = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(stopped / "checkpoints" / "last.pt")["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # Time accumulates over the two commands: the stopped one's, as its last.pt kept it.
    assert resumed["train_seconds"] >= round(last["elapsed"], 1) > 0
    assert resumed["wall_seconds"] >= round(last["wall_seconds"], 1)
    assert resumed["wall_seconds"] >= resumed["train_seconds"]
