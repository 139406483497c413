"""Honest time in results.json and run records: the whole command's wall seconds beside the
training seconds, and when validation first reached each 5-point step of top-1."""

from __future__ import annotations

import json
from pathlib import Path

from cifar100.config.schema import layered_config
from cifar100.records.record import make_ensemble_record, make_record
from cifar100.records.table import headline_table, markdown_table, table_row, wall_time
from cifar100.runs.folders import read_metrics, time_to_val
from cifar100.runtime import distributed
from cifar100.training.train import train


def test_time_to_val_is_the_first_epoch_at_each_step():
    rows = [
        {"stage": "frozen", "epoch": 1, "elapsed_s": 5.0, "val_top1": 0.55},
        {"stage": "frozen", "epoch": 2, "elapsed_s": 9.5, "val_top1": 0.6},  # exactly 60%
        {"stage": "finetune", "epoch": 1, "elapsed_s": 20.0, "val_top1": 0.58},  # fell back
        {"stage": "finetune", "epoch": 2, "elapsed_s": 31.0, "val_top1": 0.7399},  # 65 and 70
        {"stage": "finetune", "epoch": 3, "elapsed_s": 40.0},  # a refit row: no validation
        {"stage": "finetune", "epoch": 4, "elapsed_s": 52.5, "val_top1": 0.77},
    ]
    assert time_to_val(rows) == {"60": 9.5, "65": 31.0, "70": 31.0, "75": 52.5}  # no 80
    assert time_to_val(rows[:1]) == {} and time_to_val([]) == {}
    assert list(time_to_val(rows)) == ["60", "65", "70", "75"]  # in step order


def test_a_run_records_wall_and_training_seconds_and_time_to_val(
    fake_data_dir, tmp_path, monkeypatch
):
    """Validation is scripted (the fake data never reaches 60%); training, the test and
    the clocks are real."""
    scores = iter([0.3, 0.62, 0.58, 0.71, 0.9])

    def scripted_validation(evaluate_fn, model, batches, *args, **kwargs):
        return {"loss": 1.0, "top1": next(scores), "top5": 0.95}

    monkeypatch.setattr(distributed, "evaluate_sharded", scripted_validation)
    config = layered_config(
        "quick",
        overrides={
            "model": {"widths": [8, 16, 32, 32]},
            "data": {"data_dir": str(fake_data_dir), "train_subset": 100},
            "train": {"epochs": 5, "batch_size": 50, "eval_batch_size": 200},
        },
    )
    run_dir = tmp_path / "run"
    results = train(config, run_dir)
    assert results == json.loads((run_dir / "results.json").read_text())
    assert results["wall_seconds"] >= results["train_seconds"] > 0
    assert results["train_minutes"] == round(results["train_seconds"] / 60, 2)
    rows = read_metrics(run_dir)
    seconds = [row["elapsed_s"] for row in rows]
    assert seconds == sorted(seconds) and seconds[-1] <= results["train_seconds"]
    assert results["time_to_val"] == {
        "60": seconds[1],
        "65": seconds[3],
        "70": seconds[3],
        "75": seconds[4],
        "80": seconds[4],
    }

    record = make_record(run_dir, "timed")
    for key in ("wall_seconds", "train_seconds", "time_to_val", "train_minutes"):
        assert record[key] == results[key], key
    minutes = results["wall_seconds"] / 60
    assert wall_time(record) == f"{minutes:.1f} min"
    assert f"| {minutes:.1f} min |" in markdown_table([record])


def _record(name: str, **extra) -> dict:
    return {
        "name": name,
        "model": "cnn-fast",
        "test_top1": 0.7,
        "test_top5": 0.9,
        "train_minutes": 2.0,
        "hardware": {"gpu": "NVIDIA H200"},
        "command": f"cifar100 train --preset {name}",
        **extra,
    }


def test_tables_show_wall_time_and_a_dash_for_older_records():
    old, new = _record("old"), _record("new", test_top1=0.8, wall_seconds=95.0)
    assert wall_time(old) == "—" and wall_time(new) == "1.6 min"
    full = markdown_table([old, new]).splitlines()
    assert "| Training time | Wall time | Hardware |" in full[0]
    assert "| 2.0 min | — | NVIDIA H200 |" in full[2]
    assert "| 2.0 min | 1.6 min | NVIDIA H200 |" in full[3]
    headline = headline_table([old, new]).splitlines()
    assert "| Training time | Wall time | Record |" in headline[0]
    assert "| 80.00% | 2.0 min | 1.6 min | `new` |" in headline[2]
    assert len(table_row(new)) == 8  # the row others unpack keeps its shape


def test_an_ensemble_sums_its_members_seconds_only_where_all_have_them(tmp_path):
    report = tmp_path / "report-ensemble"
    report.mkdir()
    runs = []
    for name, seconds in (("a", {"train_seconds": 60.0, "wall_seconds": 80.0}), ("b", {})):
        run = tmp_path / name
        run.mkdir()
        results = {"model": "cnn-fast", "test_top1": 0.5, "test_top5": 0.8, **seconds}
        (run / "results.json").write_text(json.dumps(results))
        (run / "run.json").write_text("{}")
        (run / "config.yaml").write_text("model: {name: cnn-fast}\n")
        runs.append(str(run))
    body = {"runs": runs, "top1": 0.6, "top5": 0.85}
    (report / "report.json").write_text(json.dumps(body))
    record = make_ensemble_record(report)
    assert "wall_seconds" not in record and "train_seconds" not in record  # b's is unknown
    both = json.loads(Path(runs[1], "results.json").read_text())
    both.update(train_seconds=30.0, wall_seconds=45.5)
    Path(runs[1], "results.json").write_text(json.dumps(both))
    record = make_ensemble_record(report)
    assert record["train_seconds"] == 90.0 and record["wall_seconds"] == 125.5
