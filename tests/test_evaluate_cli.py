"""``cifar100 evaluate`` and ``cifar100 compare`` end to end on a tiny trained run."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cifar100.cli import main
from cifar100.records.table import END, START

CHROMIUM = Path("/usr/bin/chromium")
WINDOW = (1280, 2400)


@pytest.fixture(scope="module")
def trained_run(fake_data_dir, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    assert (
        main(
            [
                "train",
                "--preset",
                "quick",
                "--epochs",
                "1",
                "--data-dir",
                str(fake_data_dir),
                "--run-dir",
                str(run_dir),
            ]
        )
        == 0
    )
    return run_dir


def _tta(run_dir: Path) -> list[str]:
    """``--tta`` when training measured its test accuracy with flip TTA (the quick preset)."""
    return ["--tta"] if json.loads((run_dir / "results.json").read_text())["tta_flip"] else []


@pytest.fixture(scope="module")
def report_dir(trained_run, fake_data_dir) -> Path:
    assert (
        main(["evaluate", str(trained_run), "--data-dir", str(fake_data_dir), *_tta(trained_run)])
        == 0
    )
    return trained_run / "report"


def test_evaluate_writes_every_file(report_dir):
    for name in (
        "report.json",
        "report.md",
        "report.html",
        "confusion.png",
        "superclass_confusion.png",
        "reliability.png",
        "misclassified.png",
        "curves.png",
    ):
        assert (report_dir / name).stat().st_size > 0, name
    markdown = (report_dir / "report.md").read_text()
    for link in re.findall(r"\]\((\w+\.png)\)", markdown):
        assert (report_dir / link).is_file()
    assert "| **macro avg** |" in markdown


def test_report_json_is_consistent(report_dir, trained_run):
    report = json.loads((report_dir / "report.json").read_text())
    matrix = np.array(report["confusion_matrix"])
    assert matrix.shape == (100, 100) and matrix.sum() == report["images"] == 200
    assert report["top1"] == pytest.approx(np.trace(matrix) / 200)
    assert report["top1"] <= report["top5"] <= 1.0
    assert report["top1"] <= report["superclass_accuracy"]
    assert report["classification_report"]["accuracy"] == pytest.approx(report["top1"])
    assert [c["support"] for c in report["classification_report"]["classes"]] == [2] * 100
    coarse = np.array(report["superclass_confusion_matrix"])
    assert coarse.shape == (20, 20) and coarse.sum() == 200
    assert np.trace(coarse) / 200 == pytest.approx(report["superclass_accuracy"])
    assert sorted(report["class_order"]) == list(range(100))
    assert 0.0 <= report["ece"] <= 1.0 and len(report["calibration"]["bins"]) == 15
    # Same checkpoint, same test images, same TTA: the number training reported.
    results = json.loads((trained_run / "results.json").read_text())
    assert report["top1"] == pytest.approx(results["test_top1"])
    assert report["top5"] == pytest.approx(results["test_top5"])
    assert report["tta_flip"] == results["tta_flip"] and report["runs"] == [str(trained_run)]


def test_html_is_self_contained(report_dir):
    page = (report_dir / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == 5
    assert not re.search(r'(src|href)="(?!data:image/png;base64,|#)', page)
    assert "<script" not in page and "<link" not in page


def _chromium(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    if not CHROMIUM.is_file():
        pytest.fail(f"{CHROMIUM} not found: install it (apt-get install -y chromium)")
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--hide-scrollbars",
    ]
    return subprocess.run(
        [str(CHROMIUM), *flags, *args], capture_output=True, text=True, timeout=120, check=True
    )


def test_html_renders_in_headless_chromium(report_dir, tmp_path):
    url = (report_dir / "report.html").resolve().as_uri()
    shot = tmp_path / "report.png"
    _chromium(
        f"--window-size={WINDOW[0]},{WINDOW[1]}", f"--screenshot={shot}", url, tmp_path=tmp_path
    )
    image = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert image.shape == (WINDOW[1], WINDOW[0], 3)
    assert image.std() > 20  # not a blank page
    ink = (image.sum(axis=2) < 200).mean(axis=1)  # dark pixels per row: text, matrix labels
    assert (ink[:120] > 0).any(), "no title drawn at the top"
    assert (ink[400:1400] > 0).sum() > 300, "the confusion matrix figure did not render"
    dom = _chromium("--dump-dom", url, tmp_path=tmp_path).stdout
    assert re.search(r'<img id="confusion-img"[^>]*src="data:image/png;base64,', dom)
    for table in ("class-report", "superclass-report", "confused-pairs"):
        assert f'<table id="{table}">' in dom
    class_table = dom.split('<table id="class-report">')[1].split("</table>")[0]
    assert class_table.count("<tr") == 1 + 100 + 3  # header, classes, accuracy and averages


def test_every_embedded_image_decodes_in_chromium(report_dir, tmp_path):
    """A probe copy of the page records each image's decoded size into the DOM."""
    probe = tmp_path / "probe.html"
    script = (
        "<script>window.onload = () => { for (const img of document.images) "
        "img.setAttribute('data-decoded', img.naturalWidth + 'x' + img.naturalHeight); }"
        "</script>"
    )
    probe.write_text(
        (report_dir / "report.html").read_text().replace("</body>", script + "</body>")
    )
    dom = _chromium("--dump-dom", probe.as_uri(), tmp_path=tmp_path).stdout
    decoded = dict(re.findall(r'<img id="([\w-]+)"[^>]*data-decoded="(\d+x\d+)"', dom))
    assert len(decoded) == 5
    for stem, size in decoded.items():
        expected = Image.open(report_dir / f"{stem.removesuffix('-img')}.png").size
        assert size == f"{expected[0]}x{expected[1]}", stem


def test_ensemble_of_one_model_twice_equals_the_model(
    trained_run, fake_data_dir, tmp_path, capsys, report_dir
):
    out = tmp_path / "ensemble"
    assert (
        main(
            [
                "evaluate",
                str(trained_run),
                str(trained_run),
                "--data-dir",
                str(fake_data_dir),
                *_tta(trained_run),
                "--out",
                str(out),
                "--json",
            ]
        )
        == 0
    )
    printed = json.loads(capsys.readouterr().out)
    single = json.loads((report_dir / "report.json").read_text())
    ensemble = json.loads((out / "report.json").read_text())
    assert printed["top1"] == ensemble["top1"] == pytest.approx(single["top1"])
    assert ensemble["nll"] == pytest.approx(single["nll"], rel=1e-6)
    assert len(ensemble["members"]) == 2 and "ensemble of 2 runs" in ensemble["title"]
    # Scored on the validation split the members share, as the single run is.
    assert printed["val_top1"] == ensemble["val_top1"] == pytest.approx(single["val_top1"])
    to = tmp_path / "twice.json"
    assert main(["compare", "--record", str(out), "--to", str(to)]) == 0
    assert json.loads(to.read_text())["val_top1"] == ensemble["val_top1"]


def test_ensemble_report_becomes_a_record(trained_run, fake_data_dir, tmp_path, capsys):
    out = tmp_path / "ensemble"
    assert (
        main(
            [
                "evaluate",
                str(trained_run),
                str(trained_run),
                "--data-dir",
                str(fake_data_dir),
                "--out",
                str(out),
                "--no-calibration",
            ]
        )
        == 0
    )
    to = tmp_path / "two.json"
    assert main(["compare", "--record", str(out), "--to", str(to)]) == 0
    record, report = json.loads(to.read_text()), json.loads((out / "report.json").read_text())
    member = json.loads((trained_run / "results.json").read_text())
    assert record["test_top1"] == report["top1"] and len(record["members"]) == 2
    assert "val_top1" not in record  # --no-calibration: no validation pass, nothing invented
    assert record["parameters"] == 2 * member["parameters"]  # what the ensemble costs
    assert record["model"] == "cnn-fast + cnn-fast" and record["commit"]
    assert record["command"].startswith("cifar100 evaluate ")
    capsys.readouterr()
    assert main(["compare", str(to), "--markdown"]) == 0
    assert "| two | " in capsys.readouterr().out


def test_evaluate_missing_run_is_one_clean_line(tmp_path, capsys):
    missing = tmp_path / "nope"
    assert main(["evaluate", str(missing)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("cifar100: error:") and str(missing) in err


def test_record_and_compare(trained_run, tmp_path, capsys):
    record_path = tmp_path / "results" / "tiny-quick.json"
    assert main(["compare", "--record", str(trained_run), "--to", str(record_path)]) == 0
    record = json.loads(record_path.read_text())
    assert record["name"] == "tiny-quick" and record["model"] == "cnn-fast"
    assert record["config"]["model"]["name"] == "cnn-fast" and record["commit"]
    run_info = json.loads((trained_run / "run.json").read_text())
    # run.json keeps sys.argv (pytest's here); the record shows it as a cifar100 command.
    assert record["command"].split()[1:] == run_info["command"][1:]
    assert record["command"].startswith("cifar100 ") and record["hardware"]["device"]
    assert record_path.stat().st_size < 20_000  # metrics and settings, never weights
    capsys.readouterr()
    assert main(["compare", str(trained_run), str(record_path), "--markdown"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("| Model | Test accuracy | Top-5 | Parameters | Training time")
    assert len(lines) == 4
    run_row, record_row = lines[2].split(" | "), lines[3].split(" | ")
    assert run_row[0] == "| cnn-fast" and record_row[0] == "| tiny-quick"
    assert run_row[1:] == record_row[1:]  # the record keeps everything the table shows
    accuracy = json.loads((trained_run / "results.json").read_text())["test_top1"]
    assert run_row[1].startswith(f"{100 * accuracy:.2f}%")


def test_compare_updates_readme_between_markers(trained_run, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\nintro\n\n{START}\nold table\n{END}\n\nafter\n")
    assert main(["compare", str(trained_run), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "old table" not in text and text.startswith("# Title\n\nintro\n")
    assert text.endswith(f"{END}\n\nafter\n")
    table = text.split(START)[1].split(END)[0]
    assert "| Model | Test accuracy | Top-5 |" in table and "| cnn-fast |" in table
    assert main(["compare", str(trained_run), "--readme", str(readme)]) == 0
    assert readme.read_text() == text  # idempotent


def test_compare_errors_name_the_file(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("no markers\n")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    partial = tmp_path / "partial.json"
    partial.write_text('{"model": "cnn-fast"}')
    valid = tmp_path / "valid.json"
    valid.write_text('{"model": "cnn-fast", "test_top1": 0.5, "test_top5": 0.8}')
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    cases = [
        (["compare", str(bad)], str(bad)),
        (["compare", str(partial)], "test_top1"),
        (["compare", str(unfinished)], "results.json"),
        (["compare", str(tmp_path / "missing.json")], "missing.json"),
        (["compare", str(valid), "--readme", str(readme)], str(readme)),
        (["compare", "--record", str(unfinished)], "--to"),
    ]
    for argv, expected in cases:
        assert main(argv) == 1, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("cifar100: error:") and expected in err, err


def test_compare_minimal_record_prints_a_text_table(tmp_path, capsys):
    record = tmp_path / "seed.json"
    record.write_text(
        '{"name": "seed", "model": "cnn-seed", "test_top1": 0.4567, '
        '"test_top5": 0.75, "train_minutes": 95}'
    )
    assert main(["compare", str(record)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:3] == ["Model", "Test", "accuracy"]
    assert out[1].split()[:4] == ["seed", "45.67%", "75.00%", "1"]
    assert "1 h 35 min" in out[1]


def test_a_record_from_uncommitted_code_says_so_in_the_table(tmp_path, capsys):
    rows = []
    for name, commit in (("clean", "3cdd2e6"), ("dirty", "3cdd2e6-dirty")):
        record = tmp_path / f"{name}.json"
        record.write_text(
            json.dumps(
                {
                    "name": name,
                    "model": "cnn-fast",
                    "test_top1": 0.5,
                    "test_top5": 0.8,
                    "commit": commit,
                }
            )
        )
        assert main(["compare", str(record), "--markdown"]) == 0
        rows.append(capsys.readouterr().out.splitlines()[-1])
    assert "uncommitted" not in rows[0] and "uncommitted code" in rows[1]
