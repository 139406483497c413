"""``train.precision`` / ``--precision``: which autocast a step runs under, that a bf16 run
really trains and is tested in bf16, that `cifar100 evaluate` measures it the same way
unless told otherwise, and that its record says bf16."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from cifar100.cli import main
from cifar100.config.schema import AugmentConfig, ConfigError
from cifar100.recipes.flags import from_flags
from cifar100.records.record import make_record
from cifar100.records.table import table_row
from cifar100.runtime import speed
from cifar100.runtime.speed import autocast_dtype
from cifar100.training.distill.teacher_cache import cache_key

TINY = [
    *["--set", "model.widths=[8,16,32,32]", "--set", "train.batch_size=50"],
    *["--set", "train.eval_batch_size=200"],
]


@pytest.mark.parametrize(
    ("precision", "device", "expected"),
    [
        ("auto", "cpu", None),  # CPU results stay fp32 unless asked
        ("auto", "cuda", torch.bfloat16),
        ("fp32", "cuda", None),
        ("bf16", "cpu", torch.bfloat16),
    ],
)
def test_precision_maps_to_the_autocast_of_a_step(precision, device, expected):
    assert autocast_dtype(precision, torch.device(device)) is expected


def test_an_unknown_precision_is_refused_with_the_choices():
    with pytest.raises(ConfigError, match="choose from auto, fp32, bf16"):
        from_flags("quick", sets=["train.precision=fp16"])


def test_a_bf16_run_trains_and_tests_in_bf16_and_evaluate_agrees(
    fake_data_dir, tmp_path, monkeypatch, capsys
):
    """A head trained on bf16 features scores lower on fp32 ones, so a run is measured at
    its training precision: in training's test pass and in `cifar100 evaluate`, whose
    figure must then equal the run's; ``--precision fp32`` still measures it in fp32."""
    seen: list[tuple[bool, torch.dtype]] = []
    conv_forward = nn.Conv2d.forward

    def recording(self, x):
        out = conv_forward(self, x)
        seen.append((self.training, out.dtype))
        return out

    monkeypatch.setattr(nn.Conv2d, "forward", recording)
    run_dir = tmp_path / "bf16"
    argv = ["train", "--preset", "quick", "--epochs", "1", "--precision", "bf16", *TINY]
    assert main([*argv, "--data-dir", str(fake_data_dir), "--run-dir", str(run_dir)]) == 0
    assert {dtype for training, dtype in seen if training} == {torch.bfloat16}
    assert seen[-1] == (False, torch.bfloat16)  # the test pass, at the training precision
    assert json.loads((run_dir / "run.json").read_text())["hardware"]["precision"] == "bf16"
    assert table_row(make_record(run_dir))[5].endswith(", bf16")
    results = json.loads((run_dir / "results.json").read_text())
    capsys.readouterr()

    seen.clear()
    common = ["--data-dir", str(fake_data_dir), "--no-calibration", "--json"]
    assert main(["evaluate", str(run_dir), *common, "--out", str(tmp_path / "run")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {dtype for _, dtype in seen} == {torch.bfloat16}
    assert report["top1"] == results["test_top1"]
    assert (run_dir / "predictions" / "test-plain-bf16.pt").is_file()

    seen.clear()
    fp32 = ["--precision", "fp32", "--out", str(tmp_path / "fp32")]
    assert main(["evaluate", str(run_dir), *common, *fp32]) == 0
    assert {dtype for _, dtype in seen} == {torch.float32}
    assert (run_dir / "predictions" / "test-plain.pt").is_file()
    full = json.loads((tmp_path / "fp32" / "report.json").read_text())
    assert [m["precision"] for m in full["members"]] == ["fp32"]


def test_an_fp32_cpu_run_is_recorded_as_fp32(tiny_run):
    assert json.loads((tiny_run / "run.json").read_text())["hardware"]["precision"] == "fp32"
    assert "bf16" not in table_row(make_record(tiny_run))[5]


def test_bf16_on_a_cpu_without_native_support_warns(monkeypatch, capsys):
    monkeypatch.setattr(speed, "cpu_has_native_bf16", lambda: False)
    speed.warn_emulated_bf16("bf16", torch.device("cpu"))
    assert "slower than in fp32" in capsys.readouterr().err
    monkeypatch.setattr(speed, "cpu_has_native_bf16", lambda: True)
    speed.warn_emulated_bf16("bf16", torch.device("cpu"))
    speed.warn_emulated_bf16("fp32", torch.device("cpu"))
    assert capsys.readouterr().err == ""


def test_teacher_logits_cached_in_bf16_are_not_reused_by_an_fp32_run():
    images = torch.zeros(4, 32, 32, 3, dtype=torch.uint8)
    fp32 = cache_key("ab" * 32, images, AugmentConfig(), 2, 0, None)
    bf16 = cache_key("ab" * 32, images, AugmentConfig(), 2, 0, torch.bfloat16)
    assert fp32 != bf16 and fp32["precision"] == "fp32" and bf16["precision"] == "bfloat16"
