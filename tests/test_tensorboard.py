"""TensorBoard event files in every run folder: the curves of metrics.jsonl, the final
figures and the HParams record, read back with the ``tensorboard`` package's reader."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from cifar100.runs import tensorboard
from cifar100.runs.folders import append_metrics, load_run_config, truncate_metrics


def _row(epoch: int, loss: float, stage: str = "main") -> dict:
    return {"stage": stage, "epoch": epoch, "lr": 0.1 / epoch, "train_loss": loss, "val_top1": 0.5}


def test_a_trained_run_has_its_curves_final_figures_and_settings(
    tiny_run, assert_tensorboard_mirrors_metrics
):
    curves = assert_tensorboard_mirrors_metrics(tiny_run)
    assert {"main/train_loss", "main/val_top5", "main/lr", "main/elapsed_s"} <= curves.keys()
    results = json.loads((tiny_run / "results.json").read_text())
    for name in ("test_top1", "test_top5", "test_loss", "val_top1"):
        assert curves[f"final/{name}"] == [(results["best_epoch"], np.float32(results[name]))]

    events = EventAccumulator(str(tiny_run / "tensorboard"))
    events.Reload()
    start = plugin_data_pb2.HParamsPluginData.FromString(
        events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    ).session_start_info
    config = load_run_config(tiny_run)
    assert start.hparams["optim.lr"].number_value == pytest.approx(config.optim.lr)
    assert start.hparams["model.name"].string_value == config.model.name


def test_a_resume_rewrites_the_curves_without_a_step_twice(
    tmp_path, assert_tensorboard_mirrors_metrics
):
    """A kill between the metrics row and the checkpoint: the resume drops that row and
    trains the epoch again, with other values. In the same process and in a new one."""
    for epoch, loss in ((1, 4.0), (2, 3.5), (3, 3.0)):
        append_metrics(tmp_path, _row(epoch, loss))
        tensorboard.log_epoch(tmp_path)
    truncate_metrics(tmp_path, keep_through_epoch=2, stage="main")  # as a resume does
    append_metrics(tmp_path, _row(3, 2.75))
    tensorboard.log_epoch(tmp_path)
    curves = assert_tensorboard_mirrors_metrics(tmp_path)
    assert curves["main/train_loss"] == [(1, 4.0), (2, 3.5), (3, 2.75)]

    tensorboard._open = None  # a new process: it knows nothing of the open event file
    truncate_metrics(tmp_path, keep_through_epoch=2, stage="main")
    append_metrics(tmp_path, _row(3, 2.5))
    tensorboard.log_epoch(tmp_path)
    for epoch, loss in ((1, 1.0), (2, 0.5)):  # the next stage, continuing the same file
        append_metrics(tmp_path, _row(epoch, loss, stage="finetune"))
        tensorboard.log_epoch(tmp_path)
    curves = assert_tensorboard_mirrors_metrics(tmp_path)
    assert curves["main/train_loss"] == [(1, 4.0), (2, 3.5), (3, 2.5)]
    assert curves["finetune/train_loss"] == [(1, 1.0), (2, 0.5)]
    assert len(list((tmp_path / "tensorboard").iterdir())) == 1


def test_without_tensorboard_training_works_and_one_line_says_how(fake_data_dir, tmp_path):
    shadow = tmp_path / "shadow" / "tensorboard"  # an installation without the package
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('No module named tensorboard')\n")
    run_dir = tmp_path / "run"
    path = os.pathsep.join([str(shadow.parent), os.environ.get("PYTHONPATH", "")])
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "cifar100",
            "train",
            "--epochs",
            "2",
            "--data-dir",
            str(fake_data_dir),
            "--run-dir",
            str(run_dir),
            "--set",
            "model.widths=8,16,32",
        ],
        env={**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count(tensorboard.HINT) == 1
    assert (run_dir / "results.json").is_file() and not (run_dir / "tensorboard").exists()
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2
