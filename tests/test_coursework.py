"""The coursework table: its recipe's record beside the project's best, from records only."""

from __future__ import annotations

from cifar100.cli import main
from cifar100.records.coursework import coursework_table
from cifar100.records.table import COURSEWORK_END, COURSEWORK_START, END, START


def _record(name: str, model: str, top1: float, minutes: float) -> dict:
    return {
        "name": name,
        "model": model,
        "test_top1": top1,
        "test_top5": 0.9,
        "train_minutes": minutes,
    }


def test_rows_pair_the_coursework_recipe_with_the_best_other_record():
    records = [
        _record("cnn-seed", "cnn-seed", 0.5, 40),
        _record("quick", "cnn-fast", 0.58, 4),
        _record("cnn-fast-60min", "cnn-fast", 0.72, 52),
        _record("mobilenetv2-stage1-160px", "mobilenetv2", 0.71, 13),
        {**_record("both", "cnn-fast + mobilenetv2", 0.8, 60), "members": []},
        {**_record("student", "cnn-fast", 0.74, 56), "distill": {"teachers": [{}]}},
    ]
    cnn, mobilenet = coursework_table(records).strip().splitlines()[2:]
    assert "50.00% (`cnn-seed`) | 40 min | 72.00% (`cnn-fast-60min`) | 52 min" in cnn
    assert "not recorded yet" in mobilenet and "71.00% (`mobilenetv2-stage1-160px`)" in mobilenet
    assert "both" not in mobilenet  # an ensemble is not one model
    assert "student" not in cnn  # it learned from a pre-trained teacher: not from scratch


def test_readme_gets_both_tables(tmp_path, capsys):
    record = tmp_path / "cnn-seed.json"
    record.write_text(
        '{"name": "cnn-seed", "model": "cnn-seed", "test_top1": 0.5, '
        '"test_top5": 0.8, "train_minutes": 40}'
    )
    readme = tmp_path / "README.md"
    readme.write_text(f"{START}\nx\n{END}\n\n{COURSEWORK_START}\ny\n{COURSEWORK_END}\n")
    assert main(["compare", str(record), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "| cnn-seed | 50.00%" in text and "50.00% (`cnn-seed`) | 40 min" in text
