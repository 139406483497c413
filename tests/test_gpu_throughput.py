"""benchmarks/gpu_throughput.py on the CPU (--smoke): one JSON row per preset and lever,
each lever visibly applied (compile mode, memory format, the dtype BatchNorm computes in),
a failing row recorded without stopping the next, and --budget-s skipping what is left."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_throughput.py"
COMPILED = {
    "compile": "default",
    "compile-cudagraphs": "reduce-overhead",
    "compile-max-autotune": "max-autotune-no-cudagraphs",
}


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("gpu_throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it loads
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


@pytest.fixture
def on_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_smoke_run_writes_a_row_per_lever_each_visibly_applied(bench, tmp_path):
    out = tmp_path / "throughput.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--presets", "cnn-fast", "--json", str(out)],
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = {row["lever"]: row for row in report["rows"]}
    assert list(rows) == list(bench.LEVERS) == list(report["levers"])
    assert report["peak_tflops"] > 0 and "smoke" in report["device"]
    for lever, row in rows.items():
        assert "error" not in row, row
        assert row["preset"] == "cnn-fast" and row["batch"] == 8 and row["autocast"] == "bfloat16"
        assert row["train_img_s"] > 0 and row["of_peak"] == row["tflops"] / report["peak_tflops"]
        assert lever in result.stdout
        if lever in COMPILED:
            assert row["compile_mode"] == COMPILED[lever] and row["backend"] == "eager"
            assert row["compile_s"] >= 0 and row["graphs"] >= 1 and row["eval_img_s"] is None
        else:
            assert row["compile_mode"] is None and row["compile_s"] is None
            assert row["eval_img_s"] > 0
    assert rows["eager"]["weights_format"] == "channels_last"
    assert rows["contiguous"]["weights_format"] == "contiguous"
    assert rows["eager"]["bn_computes_in"] == "bfloat16"  # what autocast hands BatchNorm
    assert rows["bn-fp32"]["bn_computes_in"] == "float32"
    assert not out.with_name(out.name + ".partial").exists()


def test_a_failing_row_is_recorded_and_the_next_still_runs(bench, tmp_path, on_cpu):
    out = tmp_path / "throughput.json"
    args = ["--smoke", "--levers", "eager", "--json", str(out)]
    assert bench.main([*args, "--presets", "no-such-preset", "resnet18-gpu"]) == 0
    failed, resnet = json.loads(out.read_text())["rows"]
    assert "no-such-preset" in failed["error"] and "train_img_s" not in failed
    assert resnet["model"] == "resnet18" and resnet["train_img_s"] > 0


def test_the_budget_skips_the_rows_it_leaves_no_time_for(bench, tmp_path, on_cpu, capsys):
    out = tmp_path / "throughput.json"
    argv = ["--smoke", "--budget-s", "0", "--json", str(out)]
    assert bench.main([*argv, "--levers", "eager", "compile"]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(row["lever"], row["preset"]) for row in rows] == [
        ("eager", "resnet18-gpu"),
        ("eager", "cnn-fast"),
        ("compile", "resnet18-gpu"),
        ("compile", "cnn-fast"),
    ]
    assert all(row["skipped"] == "--budget-s 0.0 spent" for row in rows)
    assert capsys.readouterr().out.count("spent") == 4
