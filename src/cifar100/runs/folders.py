"""Run directories: what a run was (config, commit, hardware) and what it did (metrics).

Layout of ``runs/NAME/``::

    config.yaml      resolved config          run.json       commit, hardware, versions
    metrics.jsonl    one line per epoch       curves.png     loss, top-1, top-5, lr
    checkpoints/     last.pt, best.pt         results.json   final metrics (incl. test)
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from cifar100.config.schema import Config, ConfigError, from_saved, read_yaml, save_config
from cifar100.runtime.allocator import tune_allocator
from cifar100.runtime.speed import autocast_dtype


def git_commit() -> str | None:
    root = Path(__file__).resolve().parents[3]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def hardware(device: torch.device) -> dict[str, Any]:
    info = {
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": str(device),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "allocator": tune_allocator(),
        "load_average": round(os.getloadavg()[0], 2),
    }  # > threads: the machine was shared
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def new_run_dir(root: str | Path, model_name: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = Path(root) / f"{model_name}-{stamp}"
    suffix = 1
    while path.exists():
        suffix += 1
        path = Path(root) / f"{model_name}-{stamp}-{suffix}"
    return path


def start_run(
    run_dir: Path,
    config: Config,
    device: torch.device,
    command: list[str] | None = None,
    processes: dict[str, Any] | None = None,
) -> None:
    """Create ``run_dir`` and its run.json. ``processes``: how many processes train on how
    many machines, and the launcher's command (``cifar100.runtime.distributed.launch``)."""
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    save_config(config, run_dir / "config.yaml")
    info = {
        "commit": git_commit(),
        "command": command or sys.argv,
        "started": _now(),
        "hardware": hardware(device),
        "processes": processes or {"world_size": 1, "nodes": 1, "launcher": None},
    }
    autocast = autocast_dtype(config.train.precision, device)
    info["hardware"]["precision"] = "fp32" if autocast is None else "bf16"
    if config.train.refit:  # trained on every training image: its record says so
        info["refit"] = True
    write_json(run_dir / "run.json", info)


def resume_run(
    run_dir: Path,
    config: Config,
    device: torch.device,
    command: list[str] | None = None,
    processes: dict[str, Any] | None = None,
) -> None:
    """Record a resume: the config as it now stands (--epochs, --device, --data-dir may
    have changed it) and, in run.json, the command, when, and how many processes."""
    save_config(config, run_dir / "config.yaml")
    path = run_dir / "run.json"
    info = read_json(path) if path.is_file() else {}
    resumed = {"command": command or sys.argv, "at": _now(), "device": str(device)}
    if processes is not None:
        resumed["processes"] = processes
    info.setdefault("resumed", []).append(resumed)
    write_json(path, info)


def results_summary(results: dict[str, Any]) -> str:
    """A run's final metrics in one line, as ``cifar100 train`` ends."""
    return (
        f"{results['model']}: test top-1 {results['test_top1']:.2%}, top-5 "
        f"{results['test_top5']:.2%} (best epoch {results['best_epoch']}, "
        f"{results['train_minutes']:.1f} min)"
    )


def load_run_config(run_dir: Path) -> Config:
    path = Path(run_dir) / "config.yaml"
    try:
        return from_saved(read_yaml(path))
    except ConfigError as error:
        message = str(error)
        raise ConfigError(
            message if message.startswith(str(path)) else f"{path}: {message}"
        ) from None


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def write_json(path: Path, values: dict[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(values, indent=2) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def append_metrics(run_dir: Path, row: dict[str, Any]) -> None:
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


VAL_STEPS = (60, 65, 70, 75, 80)  # validation top-1 (%) whose first arrival a record keeps


def time_to_val(rows: list[dict[str, Any]], steps: tuple[int, ...] = VAL_STEPS) -> dict[str, float]:
    """For each step of validation top-1 (in %), the training seconds (``elapsed_s``) of the
    first epoch that reached it, in the order of ``rows`` (metrics.jsonl's, across stages);
    steps never reached are absent. Time-to-accuracy read off one run."""
    reached: dict[str, float] = {}  # filled in ascending steps: a later row adds higher ones
    for row in rows:
        top1, seconds = row.get("val_top1"), row.get("elapsed_s")
        if top1 is None or seconds is None:
            continue  # a refit validates nothing
        for step in steps:
            if round(100 * top1, 6) >= step:
                reached.setdefault(str(step), seconds)
    return reached


def truncate_metrics(run_dir: Path, keep_through_epoch: int, stage: str) -> None:
    """On resume, drop rows written after the checkpoint (a kill can land between the two)."""
    rows = read_metrics(run_dir)
    stages = []
    for row in rows:
        if row.get("stage") not in stages:
            stages.append(row.get("stage"))
    order = {s: i for i, s in enumerate(stages)}
    current = order.get(stage, len(stages))
    kept = [
        r
        for r in rows
        if order[r.get("stage")] < current
        or (r.get("stage") == stage and r["epoch"] <= keep_through_epoch)
    ]
    text = "".join(json.dumps(r) + "\n" for r in kept)
    (run_dir / "metrics.jsonl").write_text(text)


def plot_curves(run_dir: Path) -> Path | None:
    """Write the training curves of ``metrics.jsonl`` to ``curves.png`` (see
    ``cifar100.runtime.plotting.curves_figure``); None before the first epoch."""
    rows = read_metrics(run_dir)
    if not rows:
        return None
    from cifar100.runtime.plotting import curves_figure

    path = run_dir / "curves.png"
    curves_figure(rows).savefig(path, dpi=100)
    return path
