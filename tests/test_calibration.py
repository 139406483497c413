"""Temperature scaling: the fit, the validation split it uses (never the test set), the
report, and predict/export with the fitted temperature."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from cifar100.cli import main
from cifar100.data.cifar import load_cifar100, make_splits
from cifar100.deploy.classifier import load_model
from cifar100.evaluation import inference, predictions
from cifar100.evaluation.calibration import fit_temperature, nll_at
from cifar100.runs.temperature import CalibrationError, load_temperature
from cifar100.runs.trained import load_trained


def test_fit_recovers_the_temperature_that_made_the_labels():
    """Labels drawn from softmax(z / 2): the best temperature for logits z is 2."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(20_000, 10, generator=generator) * 4
    labels = torch.multinomial(torch.softmax(logits / 2.0, dim=1), 1, generator=generator)[:, 0]
    fitted = fit_temperature(logits, labels)
    assert fitted == pytest.approx(2.0, rel=0.05)
    assert nll_at(logits, labels, fitted) < nll_at(logits, labels, 1.0)
    sharp = fit_temperature(logits / 3, labels)  # under-confident logits need T < 1
    assert sharp == pytest.approx(2.0 / 3, rel=0.05)


@pytest.fixture(scope="module")
def calibrated_run(learned_run, fake_data_dir, tmp_path_factory):
    """A copy of the shared learned run, evaluated with flip and shift TTA (which fits and
    writes the temperature), with every split that the fit was given recorded. The shift
    is what moves its figures: the fake images' stripes run along the rows, so a mirror
    changes little."""
    run_dir = tmp_path_factory.mktemp("calibrated") / "run"
    shutil.copytree(
        learned_run,
        run_dir,
        ignore=shutil.ignore_patterns("report*", "model.*", "calibration.json", "predictions"),
    )
    seen = []
    original = predictions.predict_logits

    def spy(model, batches, *args, **kwargs):
        seen.append(batches.split)
        return original(model, batches, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(predictions, "predict_logits", spy)
        evaluate = ["evaluate", str(run_dir), "--tta", "--tta-translate", "1"]
        assert main([*evaluate, "--data-dir", str(fake_data_dir)]) == 0
    return run_dir, seen


def test_the_temperature_is_fitted_on_the_validation_split(calibrated_run, fake_data_dir):
    run_dir, seen = calibrated_run
    dataset = load_cifar100(fake_data_dir)
    val = make_splits(dataset, 0.2, 0).val
    # The test set's pass, then the fit's, plain and with the report's TTA views: both of
    # them over the validation split.
    assert len(seen) == 3 and torch.equal(seen[0].images, dataset.test.images)
    for split in seen[1:]:
        assert torch.equal(split.images, val.images) and torch.equal(split.labels, val.labels)
    values = json.loads((run_dir / "calibration.json").read_text())
    assert values["fitted_on"] == "validation split" and values["split_seed"] == 0
    assert values["val_images"] == len(val) and values["tta_flip"] is False
    assert values["val_nll_after"] <= values["val_nll_before"] + 1e-9
    assert values["temperature"] != 1.0


def test_the_report_gives_ece_before_and_after(calibrated_run):
    run_dir, _ = calibrated_run
    report = json.loads((run_dir / "report" / "report.json").read_text())
    scaling = report["temperature_scaling"]
    assert scaling["ece_before"] == report["ece"]
    assert report["ece_calibrated"] == scaling["ece_after"] != scaling["ece_before"]
    member = scaling["members"][0]
    assert member["split_seed"] == 0 and member["val_images"] == 200
    assert report["split_seeds"] == [0]
    markdown = (run_dir / "report" / "report.md").read_text()
    assert "fitted on the validation split (split seed 0" in markdown
    assert "ECE after temperature scaling" in markdown
    assert "ECE, temperature-scaled" in (run_dir / "report" / "report.html").read_text()


def test_the_report_scores_the_runs_on_their_validation_split(calibrated_run, fake_data_dir):
    """val_top1 is the model's accuracy on its own validation split, with the report's TTA:
    what picks an ensemble or a TTA without the test set. Computed here on its own; the
    control, without TTA, differs (catches a report that scores the plain logits)."""
    from cifar100.data.batches import ImageBatches
    from cifar100.evaluation.metrics import topk_accuracy
    from cifar100.evaluation.pipeline import validation_accuracy

    run_dir, _ = calibrated_run
    report = json.loads((run_dir / "report" / "report.json").read_text())
    trained = load_trained(run_dir, torch.device("cpu"))
    val = make_splits(load_cifar100(fake_data_dir), 0.2, 0).val
    batches = ImageBatches(val, trained.preprocess, torch.device("cpu"))

    def accuracy(logits: torch.Tensor) -> tuple[float, float]:
        return tuple(topk_accuracy(logits.numpy(), val.labels.numpy(), k) for k in (1, 5))

    logits = inference.predict_logits(trained.model, batches, 100, tta_flip=True, tta_translate=1)
    expected, expected_top5 = accuracy(logits)
    assert (report["val_top1"], report["val_top5"]) == pytest.approx((expected, expected_top5))
    plain = accuracy(inference.predict_logits(trained.model, batches, 100))
    assert plain != pytest.approx((expected, expected_top5))  # the precondition: TTA shows

    # Runs on different splits: one's validation images trained the other, so no figure.
    other = load_trained(run_dir, torch.device("cpu"))
    config = other.metadata["config_obj"]
    other.metadata["config_obj"] = replace(config, data=replace(config.data, split_seed=1))
    both = [logits.numpy(), logits.numpy()]
    dataset = load_cifar100(fake_data_dir)
    assert validation_accuracy([trained, other], both, dataset) == {}
    same = validation_accuracy([trained, trained], both, dataset)
    assert same["val_top1"] == pytest.approx(expected)

    # A refit trained on its validation images too: no figure, not a flattering one.
    refit = load_trained(run_dir, torch.device("cpu"))
    refit.metadata["config_obj"] = replace(config, train=replace(config.train, refit=True))
    assert refit.validation_split is None
    assert validation_accuracy([refit, refit], both, dataset) == {}


def _image(tmp_path: Path) -> Path:
    from PIL import Image

    path = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(
        path
    )
    return path


def test_predict_and_export_use_the_fitted_temperature(
    calibrated_run, fake_data_dir, tmp_path, capsys
):
    run_dir, _ = calibrated_run
    temperature = load_temperature(run_dir / "checkpoints" / "best.pt")
    images = torch.rand(4, 3, 32, 32)
    raw = load_model(run_dir).logits(images)
    scaled = load_model(run_dir, calibrated=True).logits(images)
    assert torch.allclose(scaled, raw / temperature, atol=1e-5)
    assert torch.equal(scaled.argmax(1), raw.argmax(1))  # no prediction changes
    out = tmp_path / "model.onnx"
    assert (
        main(
            [
                "export",
                str(run_dir),
                "--format",
                "all",
                "--calibrated",
                "--out",
                str(out),
                "--data-dir",
                str(fake_data_dir),
                "--check-images",
                "20",
                "--json",
            ]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert report["temperature"] == pytest.approx(temperature)
    for exported in (out, out.with_suffix(".safetensors")):
        assert torch.allclose(load_model(exported).logits(images), scaled, atol=1e-4)
    assert (
        main(["predict", str(_image(tmp_path)), "--model", str(run_dir), "--calibrated", "--json"])
        == 0
    )
    top = json.loads(capsys.readouterr().out)[0]["top"]
    assert top[0]["probability"] < 1.0


def test_a_changed_checkpoint_needs_a_new_fit(calibrated_run, tmp_path):
    run_dir, _ = calibrated_run
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    values = json.loads((copy / "calibration.json").read_text())
    values["checkpoint_sha256"] = "0" * 64  # as after a resume that found a better model
    (copy / "calibration.json").write_text(json.dumps(values))
    with pytest.raises(CalibrationError, match="fitted for another checkpoint"):
        load_trained(copy, calibrated=True)
    (copy / "calibration.json").unlink()
    with pytest.raises(CalibrationError, match=f"cifar100 evaluate {copy}"):
        load_trained(copy, calibrated=True)
