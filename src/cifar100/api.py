"""The Python API: what the ``cifar100`` command does, as functions; ``import cifar100``
gives them all (``cifar100.train``, ``cifar100.load_model``, ...).

    config = cifar100.load_config("quick", epochs=1, overrides={"data": {"train_subset": 1000}})
    results = cifar100.train(config, "runs/first")
    model = cifar100.load_model("runs/first")          # or .pt, .onnx, .safetensors, hub folder
    model.predict(["photo.jpg"])[0].top                # [(class name, probability), ...]
    report = cifar100.evaluate(["runs/first"])         # report.{json,md,html} in runs/first/report
    print(cifar100.compare(["runs/first", "results/quick.json"], markdown=True))

The commands are these functions plus argument parsing and printing; a setting or file the
command would refuse is refused here with the same one-line message (a ``UserError``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cifar100.config.schema import Config
from cifar100.data.cifar import load_cifar100 as load_data
from cifar100.data.cifar import make_splits
from cifar100.data.images import read_image
from cifar100.deploy.classifier import Classifier, Prediction, load_model
from cifar100.deploy.exports import export_run
from cifar100.deploy.hub import export_hub
from cifar100.errors import UserError
from cifar100.evaluation.pipeline import evaluate as _evaluate
from cifar100.recipes.resolve import resolve
from cifar100.records.record import load_record, make_record
from cifar100.records.table import compare
from cifar100.runs.folders import new_run_dir
from cifar100.training.train import train as _train

__all__ = [
    "Classifier",
    "Config",
    "Prediction",
    "UserError",
    "compare",
    "evaluate",
    "export",
    "load_config",
    "load_data",
    "load_model",
    "load_record",
    "make_record",
    "make_splits",
    "new_run_dir",
    "read_image",
    "train",
]


def load_config(
    preset: str | None = "quick",
    files: list[str | Path] = (),
    overrides: dict[str, dict[str, Any]] | None = None,
    epochs: int | None = None,
) -> Config:
    """A checked config, resolved as ``cifar100 train`` resolves its flags.

    Args:
        preset: a named recipe (``src/cifar100/configs/NAME.yaml``); None: the defaults.
        files: YAML files applied on top of the preset, in order.
        overrides: ``{section: {key: value}}`` applied last, e.g. ``{"train": {"seed": 1}}``;
            a None value leaves the setting as it is. A setting that would do nothing for
            the recipe is refused, as ``--set`` refuses it.
        epochs: the length of the run, as ``--epochs``: ``train.epochs`` for a CNN, each
            stage's length for a pretrained model.
    """
    flags = {
        f"{section}.{key}": value
        for section, values in (overrides or {}).items()
        for key, value in values.items()
    }
    return resolve(preset, list(files), [], flags, epochs)


def train(
    config: Config, run_dir: str | Path, *, resume: bool = False, overwrite: bool = False
) -> dict[str, Any]:
    """Train as ``config`` says into ``run_dir``; return the final metrics (results.json).

    A ``run_dir`` that holds a run is continued with ``resume=True`` (with its own config
    and ``config`` ignored: see ``cifar100.recipes.resume.resume_config``), replaced with
    ``overwrite=True``, and refused otherwise.
    """
    return _train(config, run_dir, resume=resume, overwrite=overwrite)


def evaluate(
    runs: str | Path | list[str | Path],
    *,
    data_dir: str | Path | None = None,
    tta: bool = False,
    out: str | Path | None = None,
    device: str = "auto",
    batch_size: int = 500,
    calibrate: bool = True,
    select: bool = False,
) -> dict[str, Any]:
    """The test-set report of a run, or of several as an ensemble, as ``cifar100 evaluate``.
    ``select=True`` lets their shared validation split choose the members and weights
    (``report["selection"]``), as ``evaluate --select``.

    Writes ``report.json``, ``report.md`` (+ PNG figures) and ``report.html`` into ``out``
    (default: RUN/report, or FIRST_RUN/report-ensemble) and returns the report: ``top1``,
    ``top5``, ``superclass_accuracy``, ``macro_f1``, ``ece``, ``nll``, the per-class and
    superclass reports, the confusion matrices, ...; see ``cifar100.evaluation.pipeline``.
    """
    run_dirs = [runs] if isinstance(runs, (str, Path)) else list(runs)
    return _evaluate(run_dirs, data_dir, tta, out, device, batch_size, calibrate, select=select)


def export(
    run: str | Path,
    format: str = "onnx",
    *,
    out: str | Path | None = None,
    data_dir: str | Path | None = None,
    check_images: int = 1000,
    calibrated: bool = False,
) -> dict[str, Any]:
    """Export a run as 'onnx', 'safetensors' or 'all', each file checked against PyTorch on
    the first ``check_images`` test images, as ``cifar100 export``; returns the file paths
    (``["files"]``) and the checks (``["checks"]``). ``cifar100.load_model`` reads them.

    'hub' writes a folder to upload to a model hub as it is (default RUN/hub):
    model.safetensors, config.json and a README.md model card with metrics measured on the
    test set; returns ``{"folder", "files", "metrics", "check"}``.
    """
    if format == "hub":
        return export_hub(run, out, data_dir, check_images, calibrated)
    return export_run(run, format, out, data_dir, check_images, calibrated)
