"""benchmarks/ablation.py: one change per variant, validation only, finished runs reused."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from cifar100.runs.folders import load_run_config

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "ablation.py"
TINY = ["--set", "model.widths=[8,16,32,32]", "--set", "train.batch_size=100"]
DOC = "# Recipe\n\n<!-- ablation:start -->\nold\n<!-- ablation:end -->\n\nafter\n"


@pytest.fixture(scope="module")
def ablation():
    spec = importlib.util.spec_from_file_location("ablation", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(ablation, fake_data_dir, tmp_path, *extra: str) -> int:
    return ablation.main(
        [
            *["--epochs", "1", "--data-dir", str(fake_data_dir), *TINY],
            *["--runs-dir", str(tmp_path / "runs"), "--out", str(tmp_path / "out.json")],
            *["--doc", str(tmp_path / "recipe.md"), *extra],
        ]
    )


def test_each_variant_changes_one_setting_and_only_validation_is_read(
    ablation, fake_data_dir, tmp_path
):
    (tmp_path / "recipe.md").write_text(DOC)
    assert run(ablation, fake_data_dir, tmp_path, "--variants", "baseline", "no-translate") == 0
    runs = tmp_path / "runs" / "cnn-fast-1ep"
    base, changed = load_run_config(runs / "baseline"), load_run_config(runs / "no-translate")
    assert (base.augment.translate, changed.augment.translate) == (4, 0)
    assert base.train.epochs == 1 and base.optim.warmup_epochs == pytest.approx(3 / 15, abs=0.01)
    assert changed.optim == base.optim and changed.model == base.model
    results = json.loads((runs / "no-translate" / "results.json").read_text())
    assert "test_top1" not in results  # the test set is never evaluated
    record = json.loads((tmp_path / "out.json").read_text())
    assert [r["variant"] for r in record["rows"]] == ["baseline", "no-translate"]
    assert record["rows"][1]["val_top1"] == results["val_top1"]
    doc = (tmp_path / "recipe.md").read_text()
    delta = (results["val_top1"] - record["rows"][0]["val_top1"]) * 100
    assert "old" not in doc and doc.endswith("<!-- ablation:end -->\n\nafter\n")
    assert (
        f"| no-translate | no random 4 px crop (flip only) | {results['val_top1']:.2%} | "
        f"{delta:+.2f} |" in doc
    )


def test_a_finished_variant_is_reused_and_a_foreign_folder_refused(
    ablation, fake_data_dir, tmp_path
):
    (tmp_path / "recipe.md").write_text(DOC)
    assert run(ablation, fake_data_dir, tmp_path, "--variants", "baseline") == 0
    results = tmp_path / "runs" / "cnn-fast-1ep" / "baseline" / "results.json"
    first = (results.stat().st_mtime_ns, results.read_text())
    assert run(ablation, fake_data_dir, tmp_path, "--variants", "baseline") == 0
    assert (results.stat().st_mtime_ns, results.read_text()) == first
    with pytest.raises(SystemExit, match="holds a run of another config"):
        run(ablation, fake_data_dir, tmp_path, "--variants", "baseline", "--set", "train.seed=1")
    assert (results.stat().st_mtime_ns, results.read_text()) == first


def test_a_second_table_goes_between_its_own_markers(ablation, fake_data_dir, tmp_path):
    doc = DOC + "<!-- long:start -->\n<!-- long:end -->\n"
    (tmp_path / "recipe.md").write_text(doc)
    assert run(ablation, fake_data_dir, tmp_path, "--variants", "baseline", "--marker", "long") == 0
    text = (tmp_path / "recipe.md").read_text()
    assert "\nold\n" in text and "| baseline | the preset as it is |" in text.split("long:start")[1]


def test_an_unknown_variant_is_refused(ablation, tmp_path):
    with pytest.raises(SystemExit, match="unknown variant 'dropout'"):
        ablation.main(["--variants", "dropout", "--runs-dir", str(tmp_path)])


def test_a_distillation_variant_needs_teachers(ablation, tmp_path):
    with pytest.raises(SystemExit, match="'distill-cached' needs --teacher"):
        ablation.main(["--variants", "distill-cached", "--runs-dir", str(tmp_path)])


def test_every_variant_is_a_valid_config_of_the_preset(ablation, tiny_run):
    args = ablation.parse_args(["--epochs", "6", "--teacher", str(tiny_run)])
    configs = {
        name: ablation.variant_config(args, sets) for name, (_, sets) in ablation.VARIANTS.items()
    }
    assert configs["baseline"].optim.warmup_epochs == pytest.approx(1.2)
    assert configs["adam-plateau"].optim.schedule == "plateau"
    assert (
        configs["ema-warmup"].train.ema_warmup == "timm" and configs["ema"].train.ema_warmup is None
    )
    assert all(c.train.epochs == 6 for c in configs.values())
    resize = configs["progressive-resize"].train
    assert (resize.resize_start, resize.resize_epochs) == (24, 3)  # half of --epochs 6
    cached, online = configs["distill-cached"].distill, configs["distill-online"].distill
    assert cached.teachers == online.teachers == (str(tiny_run),)
    assert (cached.mode, cached.views, online.mode) == ("cached", 4, "online")
    assert configs["baseline"].distill.teachers == ()
