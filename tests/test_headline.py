"""The README's headline table: the best record of each model family on each kind of
hardware, generated from records, and spliced wherever a file has its markers."""

from __future__ import annotations

import json

from cifar100.cli import main
from cifar100.records.table import (
    COURSEWORK_END,
    COURSEWORK_START,
    END,
    HEADLINE_END,
    HEADLINE_START,
    START,
    headline_table,
)

CPU = {"cpu": "AMD EPYC 7B13", "threads": 2}
GPU = {"cpu": "Intel(R) Xeon(R) CPU", "threads": 16, "gpu": "NVIDIA H200"}


def _record(name: str, model: str, top1: float, hardware: dict, **extra) -> dict:
    return {
        "name": name,
        "model": model,
        "test_top1": top1,
        "test_top5": 0.9,
        "train_minutes": 30.0,
        "hardware": hardware,
        "command": f"cifar100 train --preset {name}",
        **extra,
    }


RECORDS = [
    _record("cnn-short", "cnn-fast", 0.70, CPU),
    _record("cnn-long", "cnn-fast", 0.72, CPU),
    _record("cnn-gpu", "cnn-fast", 0.75, GPU),
    _record("mnv2", "mobilenetv2", 0.80, CPU),
    _record("pair", "cnn-fast + mobilenetv2", 0.83, CPU, members=[{}, {}]),
]


def test_one_row_per_family_and_hardware_kind_cpus_first_best_first():
    rows = headline_table(RECORDS).splitlines()[2:]
    names = [row.split(" | ")[5] for row in rows]
    assert names == ["`pair`", "`mnv2`", "`cnn-long`", "`cnn-gpu`"]  # cnn-short: not the best
    assert rows[0].startswith("| ensemble | 2-thread CPU (AMD EPYC 7B13) | 83.00% |")
    assert rows[3].startswith("| cnn-fast | GPU (NVIDIA H200) | 75.00% | 30.0 min | — |")
    assert rows[3].endswith("| `cifar100 train --preset cnn-gpu` |")


def test_each_file_gets_the_tables_whose_markers_it_has(tmp_path, capsys):
    paths = []
    for i, record in enumerate(RECORDS):
        paths.append(tmp_path / f"{i}.json")
        paths[-1].write_text(json.dumps(record))
    readme, page = tmp_path / "README.md", tmp_path / "results.md"
    readme.write_text(f"intro\n{HEADLINE_START}\nold\n{HEADLINE_END}\nend\n")
    page.write_text(f"{START}\nold\n{END}\n{COURSEWORK_START}\nold\n{COURSEWORK_END}\n")
    argv = ["compare", *map(str, paths), "--readme", str(readme), "--readme", str(page)]
    assert main(argv) == 0
    headline, full = readme.read_text(), page.read_text()
    assert "old" not in headline + full and headline.startswith("intro\n")
    assert headline.count("\n| ") == 5 and "| Model |" not in headline  # header + 4 rows
    assert full.count("| cnn-short |") == 1 and "Model family" not in full
    assert "Coursework row" in full
    assert main(argv) == 0 and readme.read_text() == headline  # idempotent


def test_a_file_without_any_markers_is_refused_by_name(tmp_path, capsys):
    record, readme = tmp_path / "r.json", tmp_path / "NOTES.md"
    record.write_text(json.dumps(RECORDS[0]))
    readme.write_text("no markers here\n")
    assert main(["compare", str(record), "--readme", str(readme)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"cifar100: error: {readme}: needs the markers") and HEADLINE_START in err
    assert readme.read_text() == "no markers here\n"
