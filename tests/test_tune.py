"""``cifar100 tune``: a study on the fake data, killed with SIGKILL, then continued.

Real processes, a real SQLite study: what a crash on a long tuning run looks like.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import sqlalchemy

from cifar100.config.schema import Config, to_dict
from cifar100.models.cnn import FastCNN
from cifar100.tuning import report
from cifar100.tuning.search import apply_params, sample_params

FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
TINY = ["--epochs", "2", "--set", "model.widths=8,16,32", "--set", "train.batch_size=64"]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _tune(data_dir: Path, study_dir: Path, trials: int, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "cifar100",
        "tune",
        "--trials",
        str(trials),
        "--study-dir",
        str(study_dir),
        "--data-dir",
        str(data_dir),
        *TINY,
        *extra,
    ]


def _trials(study_dir: Path) -> list[optuna.trial.FrozenTrial]:
    if not (study_dir / "study.db").exists():
        return []
    try:
        # Never create the tables from here: the worker is creating them at this moment,
        # and two processes creating one schema race ("table studies already exists").
        storage = optuna.storages.RDBStorage(
            f"sqlite:///{study_dir / 'study.db'}", skip_table_creation=True
        )
        study = optuna.load_study(study_name="cifar100", storage=storage)
        return study.get_trials()
    except (KeyError, sqlalchemy.exc.OperationalError):  # the study is being created
        return []


def _finished(study_dir: Path) -> dict[int, tuple]:
    return {
        t.number: (t.params, t.value, t.state) for t in _trials(study_dir) if t.state in FINISHED
    }


def _finished_in_summary(study_dir: Path) -> int:
    """Finished trials as the worker's summary.csv (written atomically after each) says:
    polling it never touches the SQLite file the worker is writing."""
    try:
        rows = list(csv.DictReader((study_dir / "summary.csv").open()))
    except OSError:
        return 0
    return sum(r["state"] in ("complete", "pruned") for r in rows)


def test_killed_study_continues_and_best_config_trains(fake_data_dir, tmp_path):
    study_dir = tmp_path / "study"
    log = tmp_path / "worker.log"
    with log.open("w") as stderr:
        proc = subprocess.Popen(
            _tune(fake_data_dir, study_dir, 10),
            env=_env(),
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    deadline = time.monotonic() + 300
    while _finished_in_summary(study_dir) < 2 and time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]  # the worker must not die
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)  # no chance to clean up: a crash
    proc.wait()
    before = _finished(study_dir)
    assert len(before) >= 2

    target = len(before) + 2
    result = subprocess.run(
        _tune(fake_data_dir, study_dir, target),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    after = _finished(study_dir)
    assert len(after) == target  # the same study, topped up
    assert {n: after[n] for n in before} == before  # earlier trials kept as they were
    assert "train it: cifar100 train --config" in result.stdout

    trials = _trials(study_dir)
    rows = list(csv.DictReader((study_dir / "summary.csv").open()))
    assert [int(r["trial"]) for r in rows] == [t.number for t in trials]
    assert (study_dir / "summary.md").read_text().count("\n| ") == len(trials) + 1
    for name in ("history.png", "importances.png"):
        assert (study_dir / name).read_bytes()[:4] == b"\x89PNG"
    for t in trials:  # tuning never measures the test set
        results = Path(t.user_attrs["run_dir"]) / "results.json"
        if results.exists():
            assert "test_top1" not in json.loads(results.read_text())

    run_dir = tmp_path / "best-run"
    trained = subprocess.run(
        [
            sys.executable,
            "-m",
            "cifar100",
            "train",
            "--config",
            str(study_dir / "best.yaml"),
            "--run-dir",
            str(run_dir),
            "--json",
        ],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    best = max(
        (t for t in trials if t.state == optuna.trial.TrialState.COMPLETE), key=lambda t: t.value
    )
    assert results["val_top1"] == pytest.approx(best.value)  # the same recipe, retrained
    assert "test_top1" in results


def test_reopening_with_another_recipe_is_a_clear_error(fake_data_dir, tmp_path):
    study_dir = tmp_path / "study"
    first = subprocess.run(
        _tune(fake_data_dir, study_dir, 1), env=_env(), capture_output=True, text=True, timeout=300
    )
    assert first.returncode == 0, first.stderr[-3000:]
    other = subprocess.run(
        _tune(fake_data_dir, study_dir, 2, "--set", "optim.lr=0.05"),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert other.returncode == 1
    line = other.stderr.strip().splitlines()[-1]
    assert line.startswith("cifar100: error:") and "study.db" in line and "optim.lr" in line


class _Fixed:
    """A stand-in for an Optuna trial that answers every suggestion with one value."""

    def __init__(self, **values):
        self.values = values

    def suggest_float(self, name, low, high, log=False, step=None):
        value = self.values[name]
        assert low <= value <= high, name
        return value


def test_search_space_maps_onto_the_config():
    base = Config()
    params = sample_params(
        _Fixed(
            lr=0.01, weight_decay=1e-4, dropout=0.25, label_smoothing=0.1, augment=0.5, width=0.5
        ),
        base,
    )
    config = apply_params(base, params)
    assert config.optim.lr == 0.01 and config.optim.weight_decay == 1e-4
    assert config.model.dropout == 0.25 and config.optim.label_smoothing == 0.1
    assert config.model.widths == tuple(w // 2 for w, _ in FastCNN.STAGES)  # cnn-fast's
    assert (config.augment.translate, config.augment.rotation) == (2, 7.5)
    assert (config.augment.zoom, config.augment.contrast) == (0.05, 0.05)
    assert config.train == base.train and config.data == base.data  # nothing else moves


class _Study:
    """What ``_check_base`` reads and writes of an Optuna study."""

    def __init__(self, base: dict):
        self.user_attrs = {"base_config": base}


def test_a_study_begun_before_newer_settings_still_matches_its_base(tmp_path):
    """A study's stored base lacks settings added later (distill.*, train.refit, ...):
    they count as their defaults, so the study goes on; a real difference is named."""
    import dataclasses

    from cifar100.tuning.search import TuneError, _check_base, _comparable

    old = _comparable(Config())
    del old["distill"], old["train"]["refit"], old["train"]["ema_warmup"]
    _check_base(_Study(old), Config(), str(tmp_path / "study.db"))
    refit = dataclasses.replace(Config(), train=dataclasses.replace(Config().train, refit=True))
    with pytest.raises(TuneError, match=r"differs in train\.refit"):
        _check_base(_Study(old), refit, str(tmp_path / "study.db"))


def test_workers_with_different_seeds_never_share_a_sampler_seed():
    """Worker A (--seed 0) opens the study after one trial, worker B (--seed 1) before any:
    with ``seed + trials`` both would sample the same start-up points."""
    from cifar100.tuning.search import sampler_seed

    seeds = {(s, n): sampler_seed(s, n) for s in range(4) for n in range(50)}
    assert len(set(seeds.values())) == len(seeds)
    assert sampler_seed(0, 3) == sampler_seed(0, 3)  # a rerun samples as before


def _study_with(*values: float | None) -> optuna.Study:
    """An in-memory study: a finished trial per value (None: pruned at 0.25)."""
    study = optuna.create_study(direction="maximize")
    lr = optuna.distributions.FloatDistribution(1e-4, 1.0, log=True)
    for number, value in enumerate(values):
        state = optuna.trial.TrialState.COMPLETE if value is not None else FINISHED[1]
        trial = optuna.trial.create_trial(
            params={"lr": 0.01 * (number + 1)},
            distributions={"lr": lr},
            value=value,
            state=state,
            intermediate_values={0: 0.25},
            user_attrs={"config": to_dict(Config())},
        )
        study.add_trial(trial)
    return study


def test_the_closing_lines_name_the_best_trial_and_how_to_train_it(tmp_path):
    where = "studies/quick/study.db"
    assert report.outcome(_study_with(None), tmp_path, where) == (
        f"\n1 finished trials in {where}; summary: {tmp_path / 'summary.md'}\n"
        "no trial completed yet: no best.yaml"
    )
    assert report.outcome(_study_with(0.5, None, 0.625), tmp_path, where) == (
        f"\n3 finished trials in {where}; summary: {tmp_path / 'summary.md'}\n"
        "best: trial 2, validation top-1 62.50%, lr=0.03\n"
        f"train it: cifar100 train --config {tmp_path / 'best.yaml'}"
    )
