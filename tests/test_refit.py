"""Refit mode (``train.refit`` / ``--refit``): every training image trains, the validation
split is never drawn nor read, the best checkpoint is the last epoch, and the run, its
results and its record say so."""

from __future__ import annotations

import json

import pytest
import torch

from cifar100.cli import main
from cifar100.config.schema import ConfigError
from cifar100.data import cifar
from cifar100.data.cifar import load_cifar100, make_splits
from cifar100.evaluation import pipeline
from cifar100.recipes.flags import from_flags
from cifar100.records.record import make_record
from cifar100.records.table import table_row
from cifar100.runtime import distributed
from cifar100.runtime.checkpoint import load_checkpoint

TINY = [
    *["--set", "model.widths=[8,16,32,32]", "--set", "train.batch_size=50"],
    *["--set", "train.eval_batch_size=200"],
]


def _refuse(*args, **kwargs):
    raise AssertionError("a refit touched the validation split")


def test_a_refit_never_reads_validation_and_keeps_the_last_epoch(
    fake_data_dir, tmp_path, monkeypatch
):
    monkeypatch.setattr(cifar, "stratified_split", _refuse)  # the split is never even drawn
    monkeypatch.setattr(distributed, "evaluate_sharded", _refuse)  # nor anything validated
    run_dir = tmp_path / "refit"
    argv = ["train", "--preset", "quick", "--epochs", "2", "--refit", *TINY]
    assert main([*argv, "--data-dir", str(fake_data_dir), "--run-dir", str(run_dir)]) == 0
    best = load_checkpoint(run_dir / "checkpoints" / "best.pt")
    last = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert best["epoch"] == last["epoch"] == 2 and best["val"] is None
    assert all(torch.equal(best["model"][k], last["model"][k]) for k in best["model"])
    results = json.loads((run_dir / "results.json").read_text())
    assert results["refit"] is True and results["val_top1"] is None
    assert results["best_epoch"] == 2 and results["train_images"] == 1000  # all of them
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and not any(k.startswith("val_") for k in rows[0])
    assert json.loads((run_dir / "run.json").read_text())["refit"] is True
    record = make_record(run_dir)
    assert record["refit"] is True and "refit" in table_row(record)[1]
    # Calibration would fit on the "validation" images a refit trained on: it is skipped.
    monkeypatch.setattr(pipeline, "make_figures", lambda *args: {})  # not what is tested
    report = pipeline.evaluate([run_dir], fake_data_dir, out=tmp_path / "report")
    assert "temperature_scaling" not in report
    assert not (run_dir / "calibration.json").exists()


def test_a_refit_split_has_every_training_image_and_no_validation(fake_data_dir):
    dataset = load_cifar100(fake_data_dir)
    splits = make_splits(dataset, 0.2, 0, refit=True)
    assert len(splits.train) == len(dataset.train) and len(splits.val) == 0
    assert torch.equal(splits.train_index, torch.arange(len(dataset.train)))
    subset = make_splits(dataset, 0.2, 0, train_subset=200, refit=True)
    assert len(subset.train) == 200 and torch.bincount(subset.train.labels).max() == 2


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["optim.schedule=plateau"], "plateau schedule steps on the validation loss"),
        (["train.early_stopping=3"], "train.early_stopping .*no validation split"),
    ],
)
def test_a_refit_refuses_what_needs_validation(sets, message):
    with pytest.raises(ConfigError, match=message):
        from_flags("quick", sets=sets, refit=True)


def test_tuning_refuses_a_refit(tmp_path):
    from cifar100.tuning.search import run_study

    with pytest.raises(ConfigError, match="tuning selects on the validation split"):
        run_study(tmp_path / "study", from_flags("quick", refit=True), trials=1)
