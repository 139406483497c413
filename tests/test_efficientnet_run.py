"""A tiny efficientnet-lite0 run on the fake data: both stages, export, predict, evaluate.

64 px keeps it to seconds while every stride-2 conv still pads TF-style (asymmetrically),
so the ONNX parity check covers the padding too.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import write_fake_cifar

from cifar100.cli import main
from cifar100.deploy.classifier import load_model
from cifar100.deploy.exports import export_run
from cifar100.runs.trained import load_trained

PHOTOS = ["bird.png", "cat.png", "dragonfly.png", "missvickie_potato_chips.png"]


@pytest.fixture(scope="module")
def small_data_dir(tmp_path_factory) -> Path:
    """Half the shared fake set (500 train images): stage 1 extracts them all, and mirrors."""
    return write_fake_cifar(tmp_path_factory.mktemp("small_fake"), train_per_class=5)


@pytest.fixture(scope="module")
def lite_run(small_data_dir, shared_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lite")
    weights = shared_dir / "weights" / "efficientnet-lite0-57934424.pth"
    with pytest.MonkeyPatch.context() as mp:  # module scope: the autouse cache comes later
        mp.setenv("CIFAR100_CACHE", str(root / "cache"))
        code = main(
            [
                "train",
                "--preset",
                "efficientnet-lite0-finetune",
                "--epochs",
                "1",
                "--train-subset",
                "200",
                "--data-dir",
                str(small_data_dir),
                "--run-dir",
                str(root / "run"),
                "--set",
                "model.image_size=64",
                "--set",
                f"model.weights={weights}",
                "--set",
                "transfer.compile=false",
                "--set",
                "transfer.stage1_batch_size=50",
                "--set",
                "train.batch_size=50",
                "--set",
                "train.eval_batch_size=100",
            ]
        )
    assert code == 0
    return root / "run"


def test_both_stages_ran_from_the_lite0_weights(lite_run):
    rows = [json.loads(line) for line in (lite_run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["epoch"]) for r in rows] == [("frozen", 1), ("finetune", 1)]
    weights = json.loads((lite_run / "run.json").read_text())["pretrained_weights"]
    assert weights["sha256"].startswith("579344248a93")
    trained = load_trained(lite_run)
    assert trained.preprocess.size == 64
    assert trained.preprocess.mean.flatten().tolist() == pytest.approx([127 / 255] * 3)
    assert trained.preprocess.std.flatten().tolist() == pytest.approx([128 / 255] * 3)


@pytest.fixture(scope="module")
def exported(lite_run, small_data_dir) -> dict:
    """ONNX and safetensors beside the run, each checked on the 200 fake test images."""
    return export_run(lite_run, "all", None, str(small_data_dir), 200)


def test_export_onnx_and_safetensors_match_pytorch(exported):
    report = exported
    onnx_check = report["checks"]["onnx"]
    assert onnx_check["images"] == 200
    assert onnx_check["top1_agreement"] >= 0.999 and onnx_check["max_abs_logit_diff"] < 1e-4
    assert report["checks"]["safetensors"]["max_abs_logit_diff"] == 0.0
    import onnxruntime as ort

    meta = ort.InferenceSession(report["files"]["onnx"]).get_modelmeta().custom_metadata_map
    assert meta["model_name"] == "efficientnet-lite0" and meta["model_input_size"] == "64"


def test_predict_agrees_between_run_and_onnx(lite_run, exported, shared_dir):
    photos = [shared_dir / "samples" / "imagenet" / name for name in PHOTOS]
    from_run = load_model(lite_run).predict(photos)
    from_onnx = load_model(exported["files"]["onnx"]).predict(photos)
    for a, b in zip(from_run, from_onnx, strict=True):
        assert a.error is None and b.error is None
        assert a.top[0][0] == b.top[0][0]
        assert a.top[0][1] == pytest.approx(b.top[0][1], abs=1e-5)


def test_evaluate_reports_the_test_accuracy_of_training(lite_run, small_data_dir):
    assert main(["evaluate", str(lite_run), "--data-dir", str(small_data_dir), "--tta"]) == 0
    report = json.loads((lite_run / "report" / "report.json").read_text())
    results = json.loads((lite_run / "results.json").read_text())
    assert report["images"] == 200
    # same model, same TTA; only a near-tie flipped by another batch size may differ
    assert report["top1"] == pytest.approx(results["test_top1"], abs=0.011)


def test_fresh_lite0_runs_at_odd_sizes_too():
    from cifar100.config.schema import ModelConfig
    from cifar100.models import build_model

    model = build_model(ModelConfig(name="efficientnet-lite0"), 100).eval()
    for size in (33, 97):  # odd sizes: some stride-2 convs pad symmetrically
        assert model(torch.rand(1, 3, size, size)).shape == (1, 100)
