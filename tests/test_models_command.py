"""``cifar100 models``: each pretrained backbone's cost per input size, and what each model
reached in the records of a results folder (its best test top-1 per kind of hardware)."""

from __future__ import annotations

import json
from pathlib import Path

from cifar100.cli import main

RESULTS = Path(__file__).resolve().parents[1] / "results"


def _rows(capsys, *flags: str) -> dict[str, dict]:
    assert main(["models", "--json", *flags]) == 0
    return {row["name"]: row for row in json.loads(capsys.readouterr().out)}


def test_backbones_cost_more_per_larger_input_and_cnns_keep_their_own_size(capsys, tmp_path):
    rows = _rows(capsys, "--sizes", "160", "224", "--results", str(tmp_path / "none"))
    lite2 = rows["efficientnet-lite2"]["mflops_at_size"]
    assert list(lite2) == ["160", "224"] and lite2["224"] > 1.8 * lite2["160"]
    assert (
        rows["efficientnet-lite2"]["mflops_at_size"]["224"]
        > (rows["efficientnet-lite0"]["mflops_at_size"]["224"])
    )
    assert "mflops_at_size" not in rows["cnn-fast"]  # a 32 px network: one size
    assert not any("reached" in row for row in rows.values())  # no records: nothing said


def test_each_model_reports_its_best_record_per_kind_of_hardware(capsys):
    records = [json.loads(path.read_text()) for path in RESULTS.glob("*.json")]
    lite0 = [r for r in records if r["model"] == "efficientnet-lite0"]
    best_cpu = max((r for r in lite0 if not r["hardware"].get("gpu")), key=lambda r: r["test_top1"])
    rows = _rows(capsys, "--results", str(RESULTS))
    reached = {entry["hardware"]: entry for entry in rows["efficientnet-lite0"]["reached"]}
    assert reached["2-thread CPU"]["record"] == best_cpu["name"]
    assert reached["2-thread CPU"]["test_top1"] == best_cpu["test_top1"]
    assert all(" + " not in name for name in rows)  # ensembles are no registry model

    assert main(["models", "--results", str(RESULTS)]) == 0
    text = capsys.readouterr().out
    assert f"reached {best_cpu['test_top1']:.2%} test top-1 on a 2-thread CPU" in text
    assert "MFLOPs/img at 160 / 224 / 260 px" in text
