"""Ensemble members chosen on the validation split, and the per-run logits cache behind it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cifar100.cli import main
from cifar100.data.cifar import load_cifar100, make_splits
from cifar100.evaluation import predictions
from cifar100.evaluation.ensembles import greedy_selection
from cifar100.evaluation.inference import InferenceSettings
from cifar100.evaluation.metrics import ensemble_probs, topk_accuracy
from cifar100.evaluation.predictions import cache_path, images_digest, run_logits
from cifar100.runs.trained import load_trained
from cifar100.runtime import speed


def _confident(labels: np.ndarray, classes: int, strength: float) -> np.ndarray:
    return strength * np.eye(classes)[labels]


def test_greedy_selection_keeps_the_complement_and_leaves_out_noise():
    """A strong run wrong on a fifth of the images, a confident specialist right on exactly
    those, and a run of noise: the selection takes the first two, never the third."""
    rng = np.random.default_rng(0)
    n, classes = 1000, 10
    labels = rng.integers(0, classes, n)
    wrong = (labels + 1) % classes
    hard = rng.random(n) < 0.2
    strong = _confident(np.where(hard, wrong, labels), classes, 3.0)
    specialist = np.where(hard[:, None], _confident(labels, classes, 6.0), 0.0)
    noise = rng.normal(size=(n, classes))
    counts = greedy_selection([noise, strong, specialist], labels)
    assert counts[0] == 0 and counts[1] >= 1 and counts[2] >= 1
    chosen = ensemble_probs([noise, strong, specialist], counts)
    alone = ensemble_probs([strong])
    assert topk_accuracy(chosen, labels, 1) > 0.95 > topk_accuracy(alone, labels, 1)


def test_greedy_selection_never_picks_a_copy_twice_for_nothing():
    labels = np.arange(50) % 5
    logits = np.random.default_rng(1).normal(size=(50, 5))
    assert greedy_selection([logits, logits.copy()], labels) == [1, 0]  # first of equals


@pytest.fixture
def run_copy(tiny_run, tmp_path) -> Path:
    """The shared tiny run copied, without any logits a previous test kept in it."""
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir, ignore=shutil.ignore_patterns("predictions", "report*"))
    return run_dir


@pytest.fixture
def learned_copy(learned_run, tmp_path) -> Path:
    """The shared learned run (answers that differ between images) copied the same way."""
    run_dir = tmp_path / "learned"
    shutil.copytree(learned_run, run_dir, ignore=shutil.ignore_patterns("predictions", "report*"))
    return run_dir


def test_logits_are_kept_and_reused_for_the_same_checkpoint_and_images(
    run_copy, fake_data_dir, capsys
):
    trained = load_trained(run_copy)
    test = load_cifar100(fake_data_dir).test
    flip = InferenceSettings(torch.device("cpu"), batch_size=64, tta_flip=True)
    first = run_logits(run_copy, trained, test, "test", flip)
    assert "predicting 200 test images and their mirrors" in capsys.readouterr().err
    path = cache_path(run_copy, "test", True, 0)
    assert path.name == "test-flip.pt" and path.is_file()
    again = run_logits(run_copy, trained, test, "test", flip)
    assert "read from" in capsys.readouterr().err and torch.equal(first, again)

    # Other images under the same name (another data set): computed again, not reused.
    other = test.subset(torch.arange(100))
    assert len(run_logits(run_copy, trained, other, "test", flip)) == 100
    assert "predicting 100 test images" in capsys.readouterr().err

    # A corrupt file costs a recomputation and one line, never the evaluation.
    path.write_bytes(b"not a torch file")
    repaired = run_logits(run_copy, trained, test, "test", flip)
    err = capsys.readouterr().err
    assert f"{path}: unreadable" in err and "Traceback" not in err
    assert torch.allclose(repaired, first)


def test_many_images_are_scored_by_the_frozen_compiled_network_with_the_same_logits(
    run_copy, fake_data_dir, monkeypatch, capsys
):
    """Past ``COMPILE_MIN_PIXELS`` a CPU scores with the network compiled under Inductor's
    freezing and fed one batch shape (the short last batch padded): same logits as eager."""
    trained = load_trained(run_copy)
    test = load_cifar100(fake_data_dir).test  # 200 images: batches of 64, the last of 8
    settings = InferenceSettings(torch.device("cpu"), batch_size=64, tta_flip=True)
    eager = run_logits(run_copy, trained, test, "test", settings)
    shutil.rmtree(run_copy / "predictions")
    runners = []

    def spy(*args):
        runners.append(speed.inference_runner(*args))
        return runners[-1]

    monkeypatch.setattr(speed, "COMPILE_MIN_PIXELS", 0)
    monkeypatch.setattr(predictions, "inference_runner", spy)
    compiled = run_logits(run_copy, trained, test, "test", settings)
    runner = runners[0]
    assert isinstance(runner, speed.StaticBatch) and runner.size == 64
    assert runner.module.compiled is not None, capsys.readouterr().err  # compiled, not eager
    assert torch.allclose(compiled, eager, atol=1e-4)
    assert torch.equal(compiled.argmax(dim=1), eager.argmax(dim=1))


def test_a_retrained_checkpoint_is_never_scored_with_old_logits(run_copy, fake_data_dir):
    trained = load_trained(run_copy)
    test = load_cifar100(fake_data_dir).test
    plain = InferenceSettings(torch.device("cpu"), batch_size=64)
    before = run_logits(run_copy, trained, test, "test", plain)
    checkpoint = run_copy / "checkpoints" / "best.pt"
    state = torch.load(checkpoint, weights_only=True)
    head = [k for k in state["model"] if k.endswith("weight")][-1]
    state["model"][head] = state["model"][head] * 2  # what retraining would change
    torch.save(state, checkpoint)
    after = run_logits(run_copy, load_trained(run_copy), test, "test", plain)
    assert not torch.allclose(before, after)


def test_evaluate_select_chooses_on_validation_and_reports_every_candidate(
    learned_copy, fake_data_dir, tmp_path, capsys
):
    """Catches a selection scored on the test images: the logits it kept and scored must be
    of the validation images."""
    twin = tmp_path / "twin"
    shutil.copytree(learned_copy, twin)
    out = tmp_path / "chosen"
    args = [str(learned_copy), str(twin), "--data-dir", str(fake_data_dir), "--tta"]
    assert main(["evaluate", *args, "--select", "--out", str(out), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    report = json.loads((out / "report.json").read_text())
    # Two identical runs: the second adds nothing on validation, so it is left out.
    assert printed["runs"] == report["runs"] == [str(learned_copy)] and report["weights"] == [1]
    candidates = report["selection"]["candidates"]
    assert [c["run"] for c in candidates] == [str(learned_copy), str(twin)]
    assert [c["weight"] for c in candidates] == [1, 0]
    assert candidates[0]["val_top1"] == candidates[1]["val_top1"] == report["val_top1"]
    dataset = load_cifar100(fake_data_dir)
    val = make_splits(dataset, 0.2, 0).val
    for run_dir in (learned_copy, twin):  # both scored, then the twin left out
        saved = torch.load(run_dir / "predictions" / "val-flip.pt", weights_only=True)
        assert saved["images_sha256"] == images_digest(val.images)
        scored = topk_accuracy(saved["logits"].numpy(), val.labels.numpy(), 1)
        assert candidates[0]["val_top1"] == pytest.approx(scored)
    # The precondition: the splits differ (their top-1 may still match by chance, as it
    # does on some CPUs for this small run, so the images are compared, not the scores).
    assert images_digest(val.images) != images_digest(dataset.test.images)


def test_evaluate_select_refuses_runs_on_different_splits(
    run_copy, fake_data_dir, tmp_path, capsys
):
    other = tmp_path / "other"
    shutil.copytree(run_copy, other)
    checkpoint = other / "checkpoints" / "best.pt"
    state = torch.load(checkpoint, weights_only=True)
    state["config"]["data"]["split_seed"] = 1
    torch.save(state, checkpoint)
    args = [str(run_copy), str(other), "--data-dir", str(fake_data_dir), "--select"]
    assert main(["evaluate", *args]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert "share a validation split" in err[-1] and "seed 1" in err[-1]
    assert not (run_copy / "report-ensemble").exists()
