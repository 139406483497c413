"""MLflow, opt-in: ``--set track.mlflow=URI`` logs each finished run to an MLflow store.

One MLflow run per run folder, in the experiment ``cifar100``, named after the folder:
the config as params (``optim.lr``, ...), every number of ``metrics.jsonl`` as a metric
per epoch (``STAGE/val_top1`` at step EPOCH), the final figures (``final/test_top1``, ...),
and the run's record (config.yaml, run.json, results.json, metrics.jsonl, curves.png) as
artifacts. It is logged when training ends, from the folder, so a run that was stopped and
resumed is logged once, whole. A local store (``file:./mlruns``, ``sqlite:///mlflow.db``)
needs no network.

The ``mlflow`` package is optional (``pip install 'cifar100[track]'``): asking for MLflow
without it is refused before training starts.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from cifar100.errors import UserError
from cifar100.runs.folders import read_metrics

EXPERIMENT = "cifar100"
RECORD = ("config.yaml", "run.json", "results.json", "metrics.jsonl", "curves.png")
FINAL = ("val_top1", "val_top5", "test_top1", "test_top5", "test_loss")
PARAMS_PER_CALL, METRICS_PER_CALL = 100, 1000  # MLflow's limits of one log_batch


class TrackingError(UserError):
    """A tracking setting that cannot work here."""


def require_mlflow(uri: str | None) -> None:
    """Refuse, before any training, a store that cannot be written without the package."""
    if uri is None:
        return
    try:
        import mlflow  # noqa: F401
    except ImportError:
        raise TrackingError(
            f"track.mlflow={uri}: needs the mlflow package: pip install 'cifar100[track]'"
        ) from None


def log_run(run_dir: Path, uri: str, results: dict[str, Any], settings: dict[str, Any]) -> str:
    """Log the finished run in ``run_dir`` to the MLflow store at ``uri``, ``settings``
    (``flat_settings``) as its params; its run id."""
    if uri.startswith("file:"):
        # MLflow 3 keeps its file store in maintenance and refuses it unless told: a user
        # who names a file: store has chosen it (it works offline, with no database).
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(EXPERIMENT)
    run_dir = Path(run_dir)
    run = client.create_run(
        experiment_id, run_name=run_dir.name, tags={"run_dir": str(run_dir.resolve())}
    )
    run_id = run.info.run_id
    params = [Param(k, str(v)) for k, v in settings.items()]
    metrics = _metrics(run_dir, results)
    for i in range(0, len(params), PARAMS_PER_CALL):
        client.log_batch(run_id, params=params[i : i + PARAMS_PER_CALL])
    for i in range(0, len(metrics), METRICS_PER_CALL):
        client.log_batch(run_id, metrics=[Metric(*m) for m in metrics[i : i + METRICS_PER_CALL]])
    for name in RECORD:
        if (run_dir / name).is_file():
            client.log_artifact(run_id, str(run_dir / name))
    client.set_terminated(run_id)
    return run_id


def log_run_or_warn(run_dir: Path, uri: str, results: dict, settings: dict) -> None:
    """``log_run``, and one line instead of a failure: the run itself is complete."""
    try:
        run_id = log_run(run_dir, uri, results, settings)
    except Exception as error:  # MLflow and its stores raise many kinds
        print(
            f"warning: could not log the run to MLflow at {uri} ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}); the run folder is complete",
            file=sys.stderr,
            flush=True,
        )
        return
    print(f"logged to MLflow at {uri} (run {run_id})", file=sys.stderr, flush=True)


def _metrics(run_dir: Path, results: dict[str, Any]) -> list[tuple[str, float, int, int]]:
    """(key, value, timestamp ms, step): each epoch's numbers, then the final figures."""
    now = int(time.time() * 1000)
    metrics = []
    for row in read_metrics(run_dir):
        for key, value in row.items():
            if key not in ("stage", "epoch") and _is_number(value):
                metrics.append((f"{row['stage']}/{key}", float(value), now, int(row["epoch"])))
    step = int(results.get("best_epoch") or 0)
    for key in FINAL:
        if _is_number(results.get(key)):
            metrics.append((f"final/{key}", float(results[key]), now, step))
    return metrics


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
