"""Every subcommand, driven with bad values: one ``cifar100: error:`` line, exit != 0, no
traceback, and nothing the user had is created, lost or changed."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cifar100.cli import main

MISSING = "missing-dir"  # relative: every case runs in an empty folder of its own


def _cases() -> list[tuple[str, list[str]]]:
    train, evaluate, predict = ["train"], ["evaluate"], ["predict", "img.png", "--model"]
    return [
        ("no command", []),
        ("unknown command", ["bogus"]),
        ("unknown model", [*train, "--model", "resnet9000"]),
        ("unknown preset", [*train, "--preset", "nope"]),
        ("unknown optimizer", [*train, "--set", "optim.optimizer=adamz"]),
        ("unknown schedule", [*train, "--set", "optim.schedule=zigzag"]),
        ("zero epochs", [*train, "--epochs", "0"]),
        ("negative epochs", [*train, "--epochs", "-3"]),
        ("epochs not a number", [*train, "--epochs", "many"]),
        ("negative seed", [*train, "--seed", "-1"]),
        ("empty subset", [*train, "--train-subset", "0"]),
        ("subset below a batch", [*train, "--train-subset", "10"]),
        ("zero batch", [*train, "--set", "train.batch_size=0"]),
        ("fraction out of range", [*train, "--set", "data.val_fraction=1.5"]),
        ("unknown section", [*train, "--set", "nosuch.key=1"]),
        ("unknown setting", [*train, "--set", "optim.nosuch=1"]),
        ("override without value", [*train, "--set", "optim.lr"]),
        ("override not YAML", [*train, "--set", "model.widths=[1,2"]),
        ("missing config", [*train, "--config", "nope.yaml"]),
        ("config is a folder", [*train, "--config", "."]),
        ("config not YAML", [*train, "--config", "broken.yaml"]),
        ("unknown device", [*train, "--device", "tpu"]),
        ("ignored transfer setting", [*train, "--model", "mobilenetv2", "--set", "optim.lr=0.1"]),
        (
            "transfer setting on a CNN",
            [*train, "--model", "cnn-seed", "--set", "transfer.stage1_lr=0.1"],
        ),
        ("missing data", [*train, "--data-dir", MISSING, "--run-dir", "new-run"]),
        ("folder holds a run", [*train, "--run-dir", "run"]),
        ("overwrite a folder that is no run", [*train, "--run-dir", "notes", "--overwrite"]),
        ("run folder is a file", [*train, "--run-dir", "img.png"]),
        ("folder holds a failed start", [*train, "--run-dir", "failed"]),
        (
            "missing weights file",
            [*train, "--model", "mobilenetv2", "--set", "model.weights=nope.pt"],
        ),
        ("missing teacher", [*train, "--teacher", MISSING]),
        ("corrupt teacher", [*train, "--teacher", "corrupt"]),
        ("foreign teacher", [*train, "--teacher", "foreign"]),
        ("teacher on another split", [*train, "--teacher", "run", "--set", "data.split_seed=1"]),
        ("kd weight out of range", [*train, "--teacher", "run", "--kd-weight", "2"]),
        ("kd setting without a teacher", [*train, "--kd-temperature", "2"]),
        ("distil into a transfer model", [*train, "--model", "mobilenetv2", "--teacher", "run"]),
        ("tracking store not a URI", [*train, "--set", "track.mlflow=mlruns"]),
        ("refit with a plateau schedule", [*train, "--refit", "--set", "optim.schedule=plateau"]),
        ("resume nothing", [*train, "--resume", MISSING]),
        ("resume with a teacher", [*train, "--resume", "run", "--teacher", "run"]),
        ("resume with a setting", [*train, "--resume", "run", "--set", "optim.lr=1"]),
        ("resume with overwrite", [*train, "--resume", "run", "--overwrite"]),
        ("evaluate nothing", [*evaluate, MISSING]),
        ("evaluate zero batch", [*evaluate, "run", "--batch-size", "0"]),
        ("evaluate unknown device", [*evaluate, "run", "--device", "tpu"]),
        ("evaluate corrupt checkpoint", [*evaluate, "corrupt"]),
        ("evaluate foreign checkpoint", [*evaluate, "foreign"]),
        ("predict zero top", [*predict, "run", "--top", "0"]),
        ("predict missing model", [*predict, MISSING]),
        ("predict missing image", ["predict", "nope.png", "--model", "run"]),
        ("predict foreign checkpoint", [*predict, "foreign/checkpoints/best.pt"]),
        ("predict uncalibrated run", [*predict, "run", "--calibrated"]),
        ("predict calibrated export", [*predict, "model.onnx", "--calibrated"]),
        ("export unknown format", ["export", "run", "--format", "tflite"]),
        ("export zero images", ["export", "run", "--check-images", "0"]),
        ("export missing run", ["export", MISSING]),
        ("export uncalibrated run", ["export", "run", "--calibrated"]),
        ("tune zero trials", ["tune", "--trials", "0"]),
        ("tune unknown preset", ["tune", "--preset", "nope"]),
        ("tune negative timeout", ["tune", "--timeout", "-1"]),
        ("tune zero epochs", ["tune", "--epochs", "0"]),
        ("tune unknown optimizer", ["tune", "--set", "optim.optimizer=adamz"]),
        ("tune ignored setting", ["tune", "--preset", "mobilenetv2", "--set", "optim.lr=1"]),
        ("tune study folder is a file", ["tune", "--study-dir", "img.png"]),
        ("tune study is no database", ["tune", "--study-dir", "notes"]),
        ("tune storage not a URL", ["tune", "--storage", "notes"]),
        ("tune storage unreachable", ["tune", "--storage", "postgresql://u:pw@127.0.0.1:1/db"]),
        ("tune storage without driver", ["tune", "--storage", "mysql://u@127.0.0.1:1/db"]),
        ("compare nothing", ["compare"]),
        ("compare missing", ["compare", "nope.json"]),
        ("compare bad JSON", ["compare", "broken.yaml"]),
        ("record without --to", ["compare", "--record", "run"]),
        ("data without action", ["data"]),
        ("data zero per class", ["data", "info", "--per-class", "0"]),
        ("data fraction", ["data", "info", "--val-fraction", "1.5"]),
        ("data negative seed", ["data", "info", "--seed", "-2"]),
        ("data missing", ["data", "info", "--data-dir", MISSING]),
        ("models bad flag", ["models", "--bogus"]),
    ]


def _snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        if p.is_file()
        else "dir"
        for p in sorted(root.rglob("*"))
    }


@pytest.fixture
def workdir(tmp_path, tiny_run, monkeypatch) -> Path:
    """An empty-ish folder with the things the cases point at: a trained run (no
    calibration), a corrupt and a foreign checkpoint, a broken file, an image."""
    shutil.copytree(
        tiny_run,
        tmp_path / "run",
        ignore=shutil.ignore_patterns("calibration.json", "report*", "model.*", "predictions"),
    )
    for name, content in (("corrupt", b"not a checkpoint"), ("foreign", None)):
        (tmp_path / name / "checkpoints").mkdir(parents=True)
        path = tmp_path / name / "checkpoints" / "best.pt"
        if content is None:
            torch.save({"weights": torch.zeros(3)}, path)
        else:
            path.write_bytes(content)
    (tmp_path / "broken.yaml").write_text("train: {epochs: [\n")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("not a run\n")
    (tmp_path / "notes" / "study.db").write_text("not a database\n")
    (tmp_path / "failed").mkdir()  # a run that stopped before its first checkpoint
    shutil.copy(tmp_path / "run" / "config.yaml", tmp_path / "failed" / "config.yaml")
    (tmp_path / "model.onnx").write_bytes(b"stand-in")
    from PIL import Image

    Image.new("RGB", (40, 30), (200, 30, 30)).save(tmp_path / "img.png")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CIFAR100_CACHE", str(tmp_path / "cache-never-made"))
    return tmp_path


@pytest.mark.parametrize("name, argv", _cases(), ids=[c[0] for c in _cases()])
def test_bad_input_is_one_line_and_changes_nothing(name, argv, workdir, capsys):
    before = _snapshot(workdir)
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's usage errors
        code = exit_.code
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code not in (0, None), name
    assert len(lines) == 1 and lines[0].startswith("cifar100: error: "), captured.err
    assert "Traceback" not in captured.err + captured.out
    assert _snapshot(workdir) == before  # nothing created, lost or changed


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["train", "--model", "resnet9000"], "unknown model 'resnet9000' (choose from"),
        (["train", "--epochs", "0"], "argument --epochs: must be at least 1, got 0"),
        (["export", "run", "--format", "tflite"], "choose from 'onnx', 'safetensors', 'all'"),
    ],
)
def test_the_installed_command_prints_one_line(argv, expected, tmp_path):
    """A real process: what a user sees, exit status and all."""
    result = subprocess.run(
        [sys.executable, "-m", "cifar100", *argv],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "CIFAR100_CACHE": str(tmp_path / "c")},
    )
    assert result.returncode != 0 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and expected in result.stderr
    assert result.stderr.startswith("cifar100: error: ") and "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["serve", "--port", "70000"], "argument --port: must be a port in [1, 65535], got 70000"),
        (["serve", "--port", "0"], "argument --port: must be a port in [1, 65535], got 0"),
        (["serve", "--port", "-1"], "argument --port: must be a port in [1, 65535], got -1"),
        (["serve", "--port", "http"], "argument --port: must be a whole number, got 'http'"),
        (["train", "--kd-weight", "2"], "argument --kd-weight: must be in [0, 1], got 2"),
        (["train", "--kd-weight", "-0.1"], "argument --kd-weight: must be in [0, 1], got -0.1"),
        (["train", "--kd-weight", "nan"], "argument --kd-weight: must be in [0, 1], got nan"),
        (
            ["train", "--kd-temperature", "500"],
            "argument --kd-temperature: must be in (0, 100], got 500",
        ),
    ],
)
def test_numeric_flags_out_of_range_are_usage_errors(argv, expected, tmp_path, monkeypatch, capsys):
    """Refused by the parser (exit 2) before anything runs: no model is loaded, no port bound,
    no run folder made. The model and data named do not exist, so a value the parser let
    through would fail later, and differently."""
    monkeypatch.chdir(tmp_path)
    missing = ["--model", MISSING] if argv[0] == "serve" else ["--data-dir", MISSING]
    with pytest.raises(SystemExit) as exit_:
        main([*argv, *missing])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2
    assert len(err) == 1 and err[0].startswith("cifar100: error: ") and expected in err[0], err
    assert list(tmp_path.iterdir()) == []
