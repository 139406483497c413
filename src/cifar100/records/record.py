"""Run records: what a run showed, kept without its weights.

A *run record* is a small JSON file (``results/NAME.json``) that keeps what a run showed
without its weights: metrics, resolved config, commit, hardware, wall time, command. An
ensemble's record (from its ``cifar100 evaluate`` report) holds its members' records.
``cifar100.records.table`` turns records into the README's table.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import yaml

from cifar100.errors import UserError
from cifar100.runs.folders import write_json

RECORD_VERSION = 1
RESULT_KEYS = [
    "model",
    "test_top1",
    "test_top5",
    "val_top1",
    "val_top5",
    "test_loss",
    "tta_flip",
    "tta_translate",
    "parameters",
    "train_minutes",
    "train_seconds",  # every stage's loop whole: checkpoints, validation, figures
    "wall_seconds",  # the whole command, start to the last test-set figure
    "time_to_val",  # {"60": seconds, ...}: training seconds to each validation top-1 step
    "train_images",
    "best_stage",
    "best_epoch",
    "split_seed",
    "refit",
    "distill",
    "process",
]
EVALUATION_KEYS = [
    "top1",
    "top5",
    "superclass_accuracy",
    "macro_f1",
    "ece",
    "ece_calibrated",
    "nll",
    "tta_flip",
    "tta_translate",
]


class RecordError(UserError):
    """A run directory or run record that cannot be read; the message names the file."""


def _read_json(path: Path) -> dict[str, Any]:
    try:
        values = json.loads(path.read_text())
    except FileNotFoundError:
        raise RecordError(f"{path}: file missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RecordError(f"{path}: not readable JSON ({type(error).__name__})") from None
    if not isinstance(values, dict):
        raise RecordError(f"{path}: expected a JSON object")
    return values


def _command(raw: Any) -> str:
    """run.json keeps sys.argv; argv[0] (a script path) is shown as ``cifar100``."""
    if isinstance(raw, list) and raw:
        return shlex.join(["cifar100", *map(str, raw[1:])])
    return str(raw or "")


def make_record(run_dir: str | Path, name: str | None = None) -> dict[str, Any]:
    """The run's record: metrics, resolved config, commit, hardware, wall time; no weights.

    ``run_dir`` may also be a report folder of ``cifar100 evaluate``: an ensemble's
    (``RUN1/report-ensemble/``, see :func:`make_ensemble_record`) or one run's, evaluated
    again with other test-time augmentation (see :func:`make_reevaluation_record`).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RecordError(f"{run_dir}: no such run directory")
    if not (run_dir / "results.json").exists() and (run_dir / "report.json").is_file():
        runs = _read_json(run_dir / "report.json").get("runs") or []
        if len(runs) == 1:
            return make_reevaluation_record(run_dir, name)
        return make_ensemble_record(run_dir, name)
    results_path = run_dir / "results.json"
    if not results_path.is_file():
        raise RecordError(f"{results_path}: missing (is the run finished?)")
    results, info = _read_json(results_path), _read_json(run_dir / "run.json")
    try:
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, yaml.YAMLError) as error:
        raise RecordError(
            f"{run_dir / 'config.yaml'}: unreadable ({type(error).__name__})"
        ) from None
    record = {
        "record_version": RECORD_VERSION,
        "name": name or results.get("model"),
        **{k: results[k] for k in RESULT_KEYS if k in results},
        "commit": info.get("commit"),
        "started": info.get("started"),
        "command": _command(info.get("command")),
        "hardware": info.get("hardware", {}),
        # How many processes trained, on how many machines, launched how: a multi-GPU run's
        # minutes are wall time on all of them (absent: one process, before this was kept).
        "processes": info.get("processes") or {"world_size": 1, "nodes": 1, "launcher": None},
        "run_dir": run_dir.name,
        "config": config,
    }
    report = run_dir / "report" / "report.json"
    if report.is_file():  # ``cifar100 evaluate`` has been run: keep its headline numbers
        values = _read_json(report)
        record["evaluation"] = {k: values[k] for k in EVALUATION_KEYS if k in values}
    _check_record(record, results_path)
    return record


def make_ensemble_record(report_dir: Path, name: str | None = None) -> dict[str, Any]:
    """An ensemble's record: its test metrics from the report, its members' records inside;
    parameters and training minutes are the members' sums (what the ensemble cost)."""
    report = _read_json(report_dir / "report.json")
    runs = report.get("runs") or []
    if len(runs) < 2:
        raise RecordError(f"{report_dir / 'report.json'}: not an ensemble's report")
    members = [make_record(_run_path(report_dir, run)) for run in runs]
    record = {
        "record_version": RECORD_VERSION,
        "name": name or report_dir.name,
        "model": " + ".join(m["model"] for m in members),
        "test_top1": report["top1"],
        "test_top5": report["top5"],
        **_validation(report),
        "tta_flip": report.get("tta_flip"),
        "tta_translate": report.get("tta_translate"),
        "parameters": sum(m.get("parameters") or 0 for m in members),
        "train_minutes": round(sum(m.get("train_minutes") or 0 for m in members), 2),
        **_summed_seconds(members),
        "commit": report.get("commit"),
        "started": report.get("created"),
        "command": report.get("command") or "",
        "hardware": members[0].get("hardware", {}),
        "evaluation": {k: report[k] for k in EVALUATION_KEYS if k in report},
        "members": members,
        **{k: report[k] for k in ("weights", "selection") if k in report},
    }
    _check_record(record, report_dir / "report.json")
    return record


def make_reevaluation_record(report_dir: Path, name: str | None = None) -> dict[str, Any]:
    """One run evaluated again (``cifar100 evaluate RUN --tta --tta-translate 1``): the run's
    record, with the report's test figures, test-time augmentation, command and commit."""
    report = _read_json(report_dir / "report.json")
    record = make_record(_run_path(report_dir, report["runs"][0]))
    record.update(
        {
            "name": name or report_dir.name,
            "test_top1": report["top1"],
            "test_top5": report["top5"],
            **_validation(report),  # at the report's TTA, in place of the training run's
            "tta_flip": report.get("tta_flip"),
            "tta_translate": report.get("tta_translate"),
            "train_command": record.get("command"),
            "evaluated": {"commit": report.get("commit"), "created": report.get("created")},
            "command": report.get("command") or "",
            "evaluation": {k: report[k] for k in EVALUATION_KEYS if k in report},
        }
    )
    record.pop("test_loss", None)  # the training run's, at its own TTA
    _check_record(record, report_dir / "report.json")
    return record


def _summed_seconds(members: list[dict[str, Any]]) -> dict[str, float]:
    """The members' training and wall seconds summed, each only where every member has it."""
    return {
        key: round(sum(m[key] for m in members), 1)
        for key in ("train_seconds", "wall_seconds")
        if all(m.get(key) is not None for m in members)
    }


def _validation(report: dict[str, Any]) -> dict[str, float]:
    """The report's validation top-1/top-5 (``cifar100 evaluate`` with calibration on runs
    that share a split), the figures that may choose an ensemble or a TTA."""
    return {k: report[k] for k in ("val_top1", "val_top5") if k in report}


def _run_path(report_dir: Path, run: str) -> Path:
    """A run a report names, as ``evaluate`` was given it: relative to where it ran, which
    is usually an ancestor of the report folder (runs/RUN/report -> runs/RUN)."""
    path = Path(run)
    if path.is_absolute() or path.is_dir():
        return path
    for folder in Path(report_dir).resolve().parents:
        if (folder / path / "results.json").is_file():
            return folder / path
    return path  # make_record names it in its error


def _check_record(record: dict[str, Any], path: Path) -> None:
    for key in ("model", "test_top1", "test_top5"):
        if key not in record:
            raise RecordError(f"{path}: no '{key}' (not a run's results or a run record)")


def load_record(path: str | Path) -> dict[str, Any]:
    """One table row's data from a run directory or a run record file."""
    path = Path(path)
    if path.is_dir():
        return make_record(path)
    if not path.exists():
        raise RecordError(f"{path}: no such run directory or run record")
    record = _read_json(path)
    _check_record(record, path)
    return record


def write_record(run_dir: str | Path, to: str | Path, name: str | None = None) -> dict[str, Any]:
    """Write the record of ``run_dir`` to ``to``, named ``name`` (default: its file stem)."""
    to = Path(to)
    record = make_record(run_dir, name or to.stem)
    try:
        to.parent.mkdir(parents=True, exist_ok=True)
        write_json(to, record)
    except OSError as error:
        raise RecordError(f"{to}: cannot write the record ({error.strerror or error})") from None
    return record
