"""``cifar100 data info`` on the real data set, and on broken copies of it."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from cifar100.cli import main

FOLDER = "cifar-100-python"


def test_info_json_on_the_real_set(real_data_dir, tmp_path, capsys):
    grid = tmp_path / "grid" / "samples.png"
    assert (
        main(
            [
                "data",
                "info",
                "--data-dir",
                str(real_data_dir),
                "--json",
                "--grid",
                str(grid),
                "--per-class",
                "4",
            ]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["train_images"] == 50_000 and summary["test_images"] == 10_000
    assert summary["split"] == {"train": 40_000, "val": 10_000, "seed": 0}
    assert summary["num_classes"] == 100 and summary["num_superclasses"] == 20
    assert summary["per_class_train"] == 500 and summary["per_class_test"] == 100
    assert summary["image_shape"] == [3, 32, 32]
    assert summary["class_names"][19] == "cattle" and summary["grid"] == str(grid)
    assert grid.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(grid) as image:
        image.load()  # decodes the whole file: a truncated PNG fails here
        width, height = image.size
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert 150 < width < 1000 and 100 * 20 < height < 100 * 60  # one row per class
    assert colours is None or len(colours) > 1000  # real pictures, not a blank canvas


def test_info_text_lists_superclasses(fake_data_dir, tmp_path, capsys):
    grid = tmp_path / "aug.png"
    assert (
        main(
            [
                "data",
                "info",
                "--data-dir",
                str(fake_data_dir),
                "--grid",
                str(grid),
                "--augmented",
                "--per-class",
                "2",
                "--seed",
                "3",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "train 1000 images (10 per class), test 200 (2 per class)" in out
    assert "split (seed 3): 800 train / 200 validation" in out
    assert "super_00: class_00, class_01, class_02, class_03, class_04" in out
    assert grid.stat().st_size > 1000


@pytest.fixture
def broken_copy(real_data_dir, tmp_path) -> Path:
    """meta and test copied from the real set; the caller writes ``train``."""
    folder = tmp_path / "copy" / FOLDER
    folder.mkdir(parents=True)
    for name in ("meta", "test"):
        shutil.copyfile(real_data_dir / FOLDER / name, folder / name)
    return folder


def one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("cifar100: error: ")
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err
    return captured.err


def test_truncated_train_file(real_data_dir, broken_copy, capsys):
    with open(real_data_dir / FOLDER / "train", "rb") as src:
        (broken_copy / "train").write_bytes(src.read(5_000_000))  # the first 5 MB of 154
    err = one_line_error(capsys, ["data", "info", "--data-dir", str(broken_copy.parent)])
    assert f"{broken_copy / 'train'}: unreadable or truncated" in err


def test_wrong_key_in_train_file(real_data_dir, broken_copy, capsys):
    # The real test pickle with one key renamed stands in for a train file of another format.
    with open(real_data_dir / FOLDER / "test", "rb") as f:
        entry = pickle.load(f, encoding="latin1")
    entry["labels"] = entry.pop("fine_labels")
    (broken_copy / "train").write_bytes(pickle.dumps(entry, protocol=2))
    err = one_line_error(capsys, ["data", "info", "--data-dir", str(broken_copy.parent)])
    assert f"{broken_copy / 'train'}: missing key 'fine_labels'" in err


def test_truncated_file_through_the_installed_command(real_data_dir, broken_copy, tmp_path):
    with open(real_data_dir / FOLDER / "train", "rb") as src:
        (broken_copy / "train").write_bytes(src.read(1_000_000))
    env = {**os.environ, "CIFAR100_DATA": str(broken_copy.parent)}
    result = subprocess.run(
        [sys.executable, "-m", "cifar100", "data", "info"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
    )
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith(
        f"cifar100: error: {broken_copy / 'train'}: unreadable or truncated"
    )
    assert result.stderr.count("\n") == 1


def test_unwritable_grid_is_a_one_line_error(fake_data_dir, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    err = one_line_error(
        capsys,
        ["data", "info", "--data-dir", str(fake_data_dir), "--grid", str(blocker / "grid.png")],
    )
    assert "cannot write the sample grid" in err


def test_bad_per_class_is_rejected_by_the_parser(fake_data_dir, capsys):
    with pytest.raises(SystemExit) as caught:
        main(["data", "info", "--data-dir", str(fake_data_dir), "--per-class", "0"])
    assert caught.value.code == 2
    assert "must be at least 1" in capsys.readouterr().err
