"""Multi-crop test-time augmentation (``train.tta_translate``, ``evaluate --tta-translate``):
the shifted views, their average, and a run's test figure that ``evaluate`` reproduces."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cifar100.cli import main
from cifar100.config.schema import ConfigError
from cifar100.data.batches import ImageBatches, shifted
from cifar100.data.cifar import Split, load_cifar100
from cifar100.data.preprocess import Preprocess
from cifar100.evaluation.inference import predict_logits, tta_views
from cifar100.evaluation.predictions import cache_path
from cifar100.recipes.flags import from_flags
from cifar100.records.record import make_record
from cifar100.records.table import table_row

TINY = [
    *["--set", "model.widths=[8,16,32,32]", "--set", "train.batch_size=50"],
    *["--set", "train.eval_batch_size=200"],
]


def test_a_shift_moves_the_image_diagonally_and_reflects_the_border():
    image = torch.arange(16.0).reshape(1, 1, 4, 4)
    down_right, up_left = shifted(image, 1), shifted(image, -1)
    assert torch.equal(down_right[..., 1:, 1:], image[..., :-1, :-1])
    assert torch.equal(up_left[..., :-1, :-1], image[..., 1:, 1:])
    assert torch.equal(down_right[..., 0, 1:], image[..., 1, :-1])  # reflected, not zeros
    assert torch.equal(shifted(image, 0), image)


def test_views_are_the_plain_image_first_then_mirrors_and_shifts():
    assert tta_views(False, 0) == [(False, 0)]
    assert tta_views(True, 0) == [(False, 0), (True, 0)]
    views = tta_views(True, 2)
    assert (
        len(views) == 6
        and views[0] == (False, 0)
        and set(views) == {(m, s) for m in (False, True) for s in (0, -2, 2)}
    )


def test_predicted_logits_are_the_mean_over_every_view():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8)
    labels = torch.zeros(12, dtype=torch.int64)
    batches = ImageBatches(
        Split(images, labels, labels), Preprocess(32, (0.5,) * 3, (0.25,) * 3), torch.device("cpu")
    )
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(5)).eval()
    every = torch.arange(12)
    with torch.no_grad():
        expected = torch.stack(
            [model(batches.get(every, flip=f, shift=s)) for f, s in tta_views(True, 1)]
        ).mean(0)
        plain = model(batches.get(every))
    got = predict_logits(model, batches, 5, tta_flip=True, tta_translate=1)
    assert torch.allclose(got, expected, atol=1e-5) and not torch.allclose(got, plain, atol=1e-3)


def test_a_shift_beyond_8_pixels_is_refused(capsys):
    with pytest.raises(ConfigError, match="train.tta_translate must be in"):
        from_flags("quick", sets=["train.tta_translate=9"])
    with pytest.raises(SystemExit):
        main(["evaluate", "run", "--tta-translate", "9"])
    assert "must be in [0, 8] pixels" in capsys.readouterr().err


def test_a_run_with_shift_tta_is_reproduced_by_evaluate(fake_data_dir, tmp_path, capsys):
    """Catches a training figure scored without the shift views: top-1 alone agrees at
    chance level, so the test loss is compared with the cross-entropy of the logits that
    evaluate averaged, and of flip-only TTA's (the control: they differ)."""
    run_dir = tmp_path / "tta"
    argv = ["train", "--preset", "quick", "--epochs", "1", *TINY]
    argv += ["--set", "train.tta_flip=true", "--set", "train.tta_translate=1"]
    assert main([*argv, "--data-dir", str(fake_data_dir), "--run-dir", str(run_dir)]) == 0
    results = json.loads((run_dir / "results.json").read_text())
    assert results["tta_translate"] == 1
    assert "flip + shift 1 TTA" in table_row(make_record(run_dir))[1]
    labels = load_cifar100(fake_data_dir).test.labels

    def test_loss(*tta: str) -> float:
        """Evaluate with ``tta``: the cross-entropy of the test logits it kept."""
        capsys.readouterr()
        evaluate = ["evaluate", str(run_dir), *tta, "--no-calibration", "--json"]
        assert main([*evaluate, "--data-dir", str(fake_data_dir)]) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["top1"] == pytest.approx(results["test_top1"])  # at chance: all agree
        shift = int(tta[-1]) if "--tta-translate" in tta else 0
        kept = torch.load(cache_path(run_dir, "test", True, shift), weights_only=True)
        return F.cross_entropy(kept["logits"], labels).item()

    assert test_loss("--tta", "--tta-translate", "1") == pytest.approx(
        results["test_loss"], rel=1e-5
    )
    assert test_loss("--tta") != pytest.approx(results["test_loss"], rel=1e-3)


def test_a_run_evaluated_again_with_shift_tta_becomes_its_own_record(
    tiny_run, fake_data_dir, tmp_path
):
    out = tmp_path / "report-shift"
    evaluate = ["evaluate", str(tiny_run), "--tta", "--tta-translate", "1", "--no-calibration"]
    assert main([*evaluate, "--data-dir", str(fake_data_dir), "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    to = tmp_path / "record.json"
    assert main(["compare", "--record", str(out), "--to", str(to)]) == 0
    record, trained = json.loads(to.read_text()), make_record(tiny_run)
    assert record["test_top1"] == report["top1"] and record["tta_translate"] == 1
    assert record["train_minutes"] == trained["train_minutes"]  # what training cost
    assert record["train_command"] == trained["command"]
    assert record["command"].startswith("cifar100 evaluate") and "members" not in record
    assert "flip + shift 1 TTA" in table_row(record)[1]


def test_a_report_made_elsewhere_finds_its_run_from_the_report_folder(
    tiny_run, fake_data_dir, tmp_path, monkeypatch
):
    project = tmp_path / "project"
    (project / "runs").mkdir(parents=True)
    shutil.copytree(tiny_run, project / "runs" / "tiny", ignore=shutil.ignore_patterns("report*"))
    monkeypatch.chdir(project)  # evaluate is given a relative path, as a user types it
    evaluate = ["evaluate", "runs/tiny", "--tta-translate", "1", "--no-calibration"]
    assert (
        main([*evaluate, "--data-dir", str(fake_data_dir), "--out", "runs/tiny/report-shift"]) == 0
    )
    monkeypatch.chdir(tmp_path)  # compare runs from somewhere else
    record = make_record(project / "runs" / "tiny" / "report-shift")
    assert record["tta_translate"] == 1 and record["train_command"]
