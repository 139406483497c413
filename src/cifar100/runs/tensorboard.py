"""TensorBoard event files beside ``metrics.jsonl``: ``tensorboard --logdir runs`` compares runs.

``RUN/tensorboard/`` mirrors ``metrics.jsonl``: one point per epoch of every number in a
row (train and validation loss, top-1, top-5, learning rate, seconds), tagged
``STAGE/NAME`` so that each stage of a transfer run has its own curves; at the end the
final figures (``final/test_top1``, ...) and the run's settings against them (TensorBoard's
HParams view). Only the process that writes ``metrics.jsonl`` (rank 0) writes here.

``metrics.jsonl`` stays the record: whenever the event file and it disagree (a new process,
or a resume that dropped the rows written after the last checkpoint) the folder is written
again from ``metrics.jsonl``, so a resumed run continues the same curves, no step twice.

The ``tensorboard`` package is optional (``pip install 'cifar100[track]'``); without it
training goes on and one line says how to turn the curves on.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cifar100.runs.folders import read_metrics

FOLDER = "tensorboard"
HINT = (
    "TensorBoard curves are off: pip install 'cifar100[track]' (or tensorboard) "
    "to write them to RUN/tensorboard/"
)
FINAL = ("val_top1", "val_top5", "test_top1", "test_top5", "test_loss")


@dataclass
class _EventLog:
    run_dir: Path
    writer: Any  # torch.utils.tensorboard.SummaryWriter
    rows: list[dict[str, Any]] = field(default_factory=list)  # the rows it holds


_open: _EventLog | None = None  # one run at a time: a tuning process trains many in turn
_hint_shown = False


def _summary_writer_class():
    """SummaryWriter, or None (and the hint, once per process) without ``tensorboard``."""
    global _hint_shown
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        if not _hint_shown:
            print(HINT, file=sys.stderr, flush=True)
            _hint_shown = True
        return None
    return SummaryWriter


def log_epoch(run_dir: Path) -> None:
    """Mirror the newest row of ``run_dir/metrics.jsonl``; call it after each append."""
    rows = read_metrics(run_dir)
    log = _log_holding(Path(run_dir), rows[:-1]) if rows else None
    if log is None:
        return
    _add_row(log.writer, rows[-1])
    log.rows = rows
    log.writer.flush()  # a killed run keeps every epoch it recorded


def log_results(run_dir: Path, results: dict[str, Any], settings: dict[str, Any]) -> None:
    """The final figures of ``results`` and the run's ``settings`` (``flat_settings``)
    against them; closes the run's event file."""
    global _open
    # Always from metrics.jsonl: a run resumed only to be tested writes its curves too.
    log = _restart(Path(run_dir), read_metrics(run_dir))
    if log is None:
        return
    final = {
        f"final/{k}": float(results[k]) for k in FINAL if isinstance(results.get(k), int | float)
    }
    step = int(results.get("best_epoch") or 0)
    for tag, value in final.items():
        log.writer.add_scalar(tag, value, step)
    if final:
        _add_hparams(log.writer, {k: _shown(v) for k, v in settings.items()}, final)
    log.writer.close()
    _open = None


def _log_holding(run_dir: Path, rows: list[dict[str, Any]]) -> _EventLog | None:
    """The open event log of ``run_dir`` if it holds exactly ``rows``, else a new one
    written from them."""
    if _open is not None and _open.run_dir == run_dir and _open.rows == rows:
        return _open
    return _restart(run_dir, rows)


def _restart(run_dir: Path, rows: list[dict[str, Any]]) -> _EventLog | None:
    global _open
    writer_class = _summary_writer_class()
    if writer_class is None:
        return None
    if _open is not None:
        _open.writer.close()
        _open = None
    folder = run_dir / FOLDER
    shutil.rmtree(folder, ignore_errors=True)  # events past a resume's checkpoint go too
    _open = _EventLog(run_dir, writer_class(log_dir=str(folder)), rows)
    for row in rows:
        _add_row(_open.writer, row)
    _open.writer.flush()
    return _open


def _add_row(writer, row: dict[str, Any]) -> None:
    stage, epoch = row.get("stage", "train"), int(row["epoch"])
    for key, value in row.items():
        if key not in ("stage", "epoch") and _is_number(value):
            writer.add_scalar(f"{stage}/{key}", float(value), epoch)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _shown(value: Any) -> bool | int | float | str:
    """A setting as the HParams view can show it: lists and None as text."""
    return value if isinstance(value, bool | int | float | str) else str(value)


def _add_hparams(writer, settings: dict[str, Any], final: dict[str, float]) -> None:
    """The HParams view's records, in the run's own folder: its settings, and which of its
    scalars are the metrics to compare runs by."""
    from torch.utils.tensorboard.summary import hparams

    for summary in hparams(settings, final):
        writer.file_writer.add_summary(summary)
