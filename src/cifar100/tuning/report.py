"""What a hyperparameter study has found: its trials as rows, and the files that say so.

``write_study_summary`` keeps ``summary.csv``, ``summary.md``, ``history.png``,
``importances.png`` and ``best.yaml`` up to date in the study folder after every trial;
each is written through a temporary file, so parallel workers never leave half a report.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any

import yaml

from cifar100.config.schema import Config, from_saved, to_dict
from cifar100.runtime.plotting import pyplot

try:
    import optuna
except ImportError:  # an optional dependency: cifar100[tune]
    optuna = None

STUDY_NAME = "cifar100"
PARAMS = ("lr", "weight_decay", "dropout", "label_smoothing", "augment", "width")


def finished(study) -> int:
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return len(study.get_trials(deepcopy=False, states=states))


def best_config(study) -> Config | None:
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not complete:
        return None
    return from_saved(study.best_trial.user_attrs["config"])


def trial_value(trial) -> float | None:
    """A trial's validation top-1: its result, else (pruned) the last epoch it reported."""
    steps = trial.intermediate_values
    return trial.value if trial.value is not None else (steps[max(steps)] if steps else None)


def _params(trial) -> str:
    return ", ".join(f"{k}={v:.3g}" for k, v in trial.params.items())


def trial_line(trial) -> str:
    """A finished trial in one line: state, validation top-1, parameters."""
    value = trial_value(trial)
    return (
        f"trial {trial.number} {trial.state.name.lower()}: validation top-1 "
        f"{float('nan') if value is None else value:.2%} ({_params(trial)})"
    )


def outcome(study, study_dir: Path, where: str) -> str:
    """What ``cifar100 tune`` says when the study stops (``where``: its storage): the
    finished trials, the best one and how to train it."""
    head = f"\n{finished(study)} finished trials in {where}; summary: {study_dir / 'summary.md'}"
    if best_config(study) is None:
        return f"{head}\nno trial completed yet: no best.yaml"
    best = study.best_trial
    return (
        f"{head}\nbest: trial {best.number}, validation top-1 {best.value:.2%}, {_params(best)}"
        f"\ntrain it: cifar100 train --config {study_dir / 'best.yaml'}"
    )


def trial_rows(study) -> list[dict[str, Any]]:
    """One row per trial: its state, validation top-1 (a pruned one's last), params."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        rows.append(
            {
                "trial": t.number,
                "state": t.state.name.lower(),
                "val_top1": trial_value(t),
                "epochs": len(t.intermediate_values),
                "minutes": round(t.duration.total_seconds() / 60, 2) if t.duration else None,
                **{p: t.params.get(p) for p in PARAMS},
                "run_dir": t.user_attrs.get("run_dir"),
            }
        )
    return rows


def _atomic(path: Path, write) -> None:
    """Write through a temporary file: parallel workers never leave half a report."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(tmp)
    os.replace(tmp, path)


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def write_study_summary(study, study_dir: Path) -> None:
    """summary.csv, summary.md, history.png, importances.png and best.yaml in ``study_dir``."""
    rows = trial_rows(study)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else ["trial"])
    writer.writeheader()
    writer.writerows(rows)
    _atomic(study_dir / "summary.csv", lambda p: p.write_text(buffer.getvalue()))
    importances = _importances(study)
    _atomic(study_dir / "summary.md", lambda p: p.write_text(_markdown(study, rows, importances)))
    _plot_history(rows, study_dir / "history.png")
    if importances:
        _plot_importances(importances, study_dir / "importances.png")
    config = best_config(study)
    if config is not None:
        _atomic(
            study_dir / "best.yaml", lambda p: p.write_text(_best_yaml(study, config, study_dir))
        )


def _markdown(study, rows: list[dict], importances: dict | None) -> str:
    keys = [k for k in rows[0] if k != "run_dir"] if rows else []
    lines = [f"# Study `{STUDY_NAME}`: {len(rows)} trials, {finished(study)} finished", ""]
    if best_config(study) is not None:
        best = study.best_trial
        lines += [
            f"Best: trial {best.number}, validation top-1 {best.value:.4f}. "
            "Train it: `cifar100 train --config best.yaml`.",
            "",
        ]
    lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_fmt(r[k]) for k in keys) + " |" for r in rows]
    if importances:
        lines += [
            "",
            "Parameter importances (validation top-1): "
            + ", ".join(f"{name} {value:.2f}" for name, value in importances.items()),
        ]
    return "\n".join(lines) + "\n"


def _best_yaml(study, config: Config, study_dir: Path) -> str:
    best = study.best_trial
    header = (
        f"# Best trial {best.number} of the study in {study_dir}: validation top-1 "
        f"{best.value:.4f}.\n# Its tuning budget is kept (epochs, "
        "data.train_subset): raise them for a final run, e.g.\n#   cifar100 train "
        "--config best.yaml --epochs 30 --set data.train_subset=none\n"
    )
    return header + yaml.safe_dump(to_dict(config), sort_keys=False)


def _importances(study) -> dict[str, float] | None:
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if len(complete) < 2:
        return None
    try:
        return optuna.importance.get_param_importances(study)
    except (ValueError, RuntimeError):  # e.g. every trial alike: nothing to attribute
        return None


def _plot_history(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for state, colour in (("complete", "tab:blue"), ("pruned", "tab:orange")):
        points = [
            (r["trial"], r["val_top1"])
            for r in rows
            if r["state"] == state and r["val_top1"] is not None
        ]
        if points:
            ax.scatter(*zip(*points, strict=True), color=colour, label=state, zorder=3)
    best, xs, ys = None, [], []
    for r in rows:  # best so far, over complete trials
        if r["state"] == "complete" and r["val_top1"] is not None:
            best = r["val_top1"] if best is None else max(best, r["val_top1"])
        if best is not None:
            xs.append(r["trial"])
            ys.append(best)
    if xs:
        ax.step(xs, ys, where="post", color="tab:green", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel("validation top-1")
    ax.set_title("optimisation history")
    ax.legend()
    fig.tight_layout()
    _atomic(path, lambda p: fig.savefig(p, format="png", dpi=100))
    plt.close(fig)


def _plot_importances(importances: dict[str, float], path: Path) -> None:
    plt = pyplot()
    names = list(importances)[::-1]  # largest on top
    fig, ax = plt.subplots(figsize=(6.4, 0.4 * len(names) + 1.2))
    ax.barh(names, [importances[n] for n in names], color="tab:blue")
    ax.set_xlabel("importance for validation top-1")
    ax.set_title("parameter importances")
    fig.tight_layout()
    _atomic(path, lambda p: fig.savefig(p, format="png", dpi=100))
    plt.close(fig)
