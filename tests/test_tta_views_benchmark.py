"""benchmarks/tta_views.py: validation under each TTA setting, its table written between
the markers it is told, the rest of the doc untouched."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "tta_views.py"
DOC = (
    "# TTA\n\n<!-- tta:start -->\ncnn\n<!-- tta:end -->\n\n"
    "<!-- lite:start -->\nold\n<!-- lite:end -->\n"
)


def load_script():
    spec = importlib.util.spec_from_file_location("tta_views", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_only_the_asked_settings_fill_the_named_table(tiny_run, fake_data_dir, tmp_path, capsys):
    doc = tmp_path / "tta.md"
    doc.write_text(DOC)
    args = [str(tiny_run), "--data-dir", str(fake_data_dir), "--translate", "0", "1"]
    assert load_script().main([*args, "--flip", "on", "--doc", str(doc), "--marker", "lite"]) == 0
    text = doc.read_text()
    table = text.split("<!-- lite:start -->\n")[1].split("<!-- lite:end -->")[0]
    rows = [line for line in table.splitlines() if line.startswith("| yes")]
    assert [row.split(" | ")[1:3] for row in rows] == [["0", "2"], ["1", "6"]]
    assert "| no |" not in table and "old" not in table
    assert "<!-- tta:start -->\ncnn\n<!-- tta:end -->" in text  # the other table stays
    assert "validation images" in capsys.readouterr().out
