"""The Python API end to end on the fake data set: what the commands do, as functions, with
the same answers as the commands."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cifar100
from cifar100 import api
from cifar100.cli import build_parser, main
from cifar100.recipes.flags import config_from_args

API_PAGE = Path(__file__).resolve().parents[1] / "docs" / "api.md"  # the site's Python API page
SAMPLES = ["bird.png", "cat.png", "dragonfly.png", "missvickie_potato_chips.png"]
WIDTHS = [16, 32, 32, 32]  # the narrow quick recipe of conftest's tiny_run: seconds per epoch


@pytest.fixture(scope="module")
def api_run(fake_data_dir, tmp_path_factory) -> tuple[Path, dict]:
    config = cifar100.load_config(
        "quick",
        epochs=1,
        overrides={"data": {"data_dir": str(fake_data_dir)}, "model": {"widths": WIDTHS}},
    )
    run_dir = tmp_path_factory.mktemp("api") / "run"
    return run_dir, cifar100.train(config, run_dir)


@pytest.fixture
def photos(shared_dir) -> list[Path]:
    return [shared_dir / "samples" / "imagenet" / name for name in SAMPLES]


def test_import_is_light_and_lists_the_api():
    code = (
        "import sys, cifar100; assert 'torch' not in sys.modules; "
        "print(sorted(set(cifar100.API) & set(dir(cifar100))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert "'load_model'" in out and "'train'" in out
    assert sorted(cifar100.API) == sorted(api.__all__)  # the lazy list is complete
    # A module named like an API function would shadow it once imported (cifar100.export).
    package = Path(cifar100.__file__).parent
    assert not [name for name in cifar100.API if (package / f"{name}.py").exists()]
    assert not [name for name in cifar100.API if (package / name).is_dir()]  # nor a folder


def test_load_config_resolves_as_the_train_command(fake_data_dir):
    args = build_parser().parse_args(
        [
            "train",
            "--preset",
            "quick",
            "--epochs",
            "3",
            "--data-dir",
            str(fake_data_dir),
            "--set",
            "model.widths=[16,32,32,32]",
        ]
    )
    config = cifar100.load_config(
        "quick",
        epochs=3,
        overrides={"data": {"data_dir": str(fake_data_dir)}, "model": {"widths": WIDTHS}},
    )
    assert config == config_from_args(args, "train")
    with pytest.raises(cifar100.UserError, match="would do nothing for cnn-fast"):
        cifar100.load_config("quick", overrides={"transfer": {"stage1_lr": 0.1}})


def test_train_writes_a_run_and_returns_its_results(api_run):
    run_dir, results = api_run
    assert results == json.loads((run_dir / "results.json").read_text())
    assert results["model"] == "cnn-fast" and 0 <= results["test_top1"] <= 1
    with pytest.raises(cifar100.UserError, match="holds a finished run"):
        cifar100.train(cifar100.load_config("quick"), run_dir)


def test_load_model_predicts_as_the_predict_command(api_run, photos, capsys):
    run_dir, _ = api_run
    model = cifar100.load_model(run_dir)
    assert model.class_names == [f"class_{i:02d}" for i in range(100)]
    predictions = model.predict(photos, top=3)
    assert (
        main(["predict", *map(str, photos), "--model", str(run_dir), "--top", "3", "--json"]) == 0
    )
    assert [p.to_json() for p in predictions] == json.loads(capsys.readouterr().out)
    assert main(["predict", str(photos[0]), "--model", str(run_dir), "--top", "3"]) == 0
    assert capsys.readouterr().out == str(predictions[0]) + "\n"


def test_predict_takes_tensors_and_reports_unreadable_files(api_run, tmp_path):
    model = cifar100.load_model(api_run[0])
    images = torch.rand(6, 3, 32, 32)
    probs = model.probabilities(images)
    assert probs.shape == (6, 100) and torch.allclose(probs.sum(1), torch.ones(6))
    tops = model.predict(images, top=1)
    assert [p.top[0][0] for p in tops] == [model.class_names[i] for i in probs.argmax(1)]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    (prediction,) = model.predict(broken)
    assert prediction.top == [] and "not an image Pillow can read" in prediction.error


def test_evaluate_export_and_compare(api_run, fake_data_dir, photos):
    run_dir, results = api_run
    report = cifar100.evaluate(run_dir, data_dir=fake_data_dir, tta=results["tta_flip"])
    assert report["top1"] == pytest.approx(results["test_top1"]) and report["images"] == 200
    assert json.loads((run_dir / "report" / "report.json").read_text())["top1"] == report["top1"]
    assert "temperature_scaling" in report and (run_dir / "calibration.json").is_file()

    exported = cifar100.export(run_dir, "all", data_dir=fake_data_dir, check_images=50)
    assert exported["checks"]["onnx"]["top1_agreement"] >= 0.999
    from_run = [p.top[0][0] for p in cifar100.load_model(run_dir).predict(photos)]
    for path in exported["files"].values():
        assert [p.top[0][0] for p in cifar100.load_model(path).predict(photos)] == from_run

    record = cifar100.make_record(run_dir, name="api-run")
    table = cifar100.compare([record, run_dir], markdown=True)
    rows = table.splitlines()
    assert rows[0].startswith("| Model | Test accuracy |") and len(rows) == 4
    assert rows[2].startswith(f"| api-run | {100 * results['test_top1']:.2f}%")
    assert rows[3].startswith("| cnn-fast |")


def test_the_documented_example_runs(fake_data_dir, tmp_path, monkeypatch, capsys):
    section = API_PAGE.read_text().split("# Python API", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CIFAR100_DATA", str(fake_data_dir))
    pixels = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "photo.jpg")
    exec(compile(code, str(API_PAGE), "exec"), {})
    out = capsys.readouterr().out
    assert out.startswith("photo.jpg\n") and "test top-1" in out and "| cnn-fast |" in out
    assert (tmp_path / "runs" / "api-demo" / "model.onnx").is_file()
