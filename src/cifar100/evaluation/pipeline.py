"""The test-set evaluation of one run, or an ensemble of several: every number of the
report, its figures, and the files ``report.json``, ``report.md`` (+ its PNG figures) and
one self-contained ``report.html``.

Several runs are evaluated as an ensemble: their softmax probabilities are averaged.
Temperature scaling is fitted on each run's validation split, never the test set.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from cifar100.data.cifar import Cifar100, load_cifar100, make_splits
from cifar100.errors import UserError
from cifar100.evaluation.calibration import fit_run
from cifar100.evaluation.ensembles import select_members
from cifar100.evaluation.inference import InferenceSettings
from cifar100.evaluation.metrics import (
    build_report,
    calibration,
    ensemble_probs,
    nll,
    softmax,
    topk_accuracy,
    tta_note,
)
from cifar100.evaluation.predictions import run_logits, validation_logits
from cifar100.evaluation.report.files import make_figures, write_report
from cifar100.runs.folders import git_commit
from cifar100.runs.trained import TrainedModel, checkpoint_path, load_trained
from cifar100.runtime.device import check_device, select_device
from cifar100.runtime.speed import precision_name

HEADLINE = (
    "top1",
    "top5",
    "val_top1",
    "val_top5",
    "superclass_accuracy",
    "macro_f1",
    "ece",
    "ece_calibrated",
    "nll",
    "images",
    "tta_flip",
    "runs",
    "weights",
    "split_seeds",
)


def evaluate(
    run_dirs: list[str | Path],
    data_dir: str | Path | None = None,
    tta: bool = False,
    out: str | Path | None = None,
    device: str = "auto",
    batch_size: int = 500,
    calibrate: bool = True,
    command: str | None = None,
    tta_translate: int = 0,
    select: bool = False,
    precision: str = "run",
) -> dict[str, Any]:
    """Evaluate the runs on the test set and write the report files into ``out``.

    Args:
        run_dirs: trained run folders; several are evaluated as an ensemble.
        data_dir: folder holding ``cifar-100-python/`` (default: $CIFAR100_DATA, the cache,
            or a download).
        tta: flip test-time augmentation: average with the mirrored image.
        out: report folder (default: ``default_out(run_dirs)``).
        device: auto, cpu, cuda, cuda:N or mps.
        batch_size: images per inference batch.
        calibrate: fit temperature scaling on each run's validation split (and write
            RUN/calibration.json).
        command: how the report was made, kept in it (an ensemble's record shows it).
        tta_translate: also average over the images moved this many pixels up-left and
            down-right (each mirrored too with ``tta``); 0: off.
        select: choose the members among ``run_dirs`` on their shared validation split
            (greedy selection with replacement: :mod:`cifar100.evaluation.ensembles`), weighted by
            how often each was picked; the report keeps every candidate's figures.
        precision: ``run`` (each run at the precision it trained at), ``fp32`` or ``bf16``.

    Returns:
        The report, as written to ``report.json``; ``report["files"]`` names its files.
    """
    run_dirs = [Path(run_dir) for run_dir in run_dirs]
    for run_dir in run_dirs:
        if not (run_dir / "checkpoints" / "best.pt").is_file():
            raise UserError(f"{run_dir}: not a trained run directory (no checkpoints/best.pt)")
    target = select_device(check_device(device))
    models = [load_trained(run_dir, target) for run_dir in run_dirs]  # before the data
    calibrate = calibrate and _can_calibrate(run_dirs, models)
    dataset = load_cifar100(data_dir)
    settings = InferenceSettings(target, batch_size, tta, tta_translate, precision)
    weights, selection = None, None
    if select:
        run_dirs, models, weights, selection = select_members(run_dirs, models, dataset, settings)
    report, probs = evaluate_runs(run_dirs, models, dataset, settings, calibrate, weights)
    if selection is not None:
        report.update({"weights": weights, "selection": selection})
    if command is not None:
        report["command"] = command
    figures = make_figures(report, probs, dataset, run_dirs[0])
    write_report(report, figures, Path(out) if out else default_out(run_dirs))
    return report


def default_out(run_dirs: list[Path]) -> Path:
    return run_dirs[0] / ("report" if len(run_dirs) == 1 else "report-ensemble")


def _can_calibrate(run_dirs: list[Path], models: list[TrainedModel]) -> bool:
    refits = [
        str(run_dir)
        for run_dir, trained in zip(run_dirs, models, strict=True)
        if trained.validation_split is None
    ]
    if refits:
        print(
            f"{', '.join(refits)}: trained on every training image (refit), so no held-out "
            "validation images are left to fit a temperature on; calibration skipped",
            file=sys.stderr,
        )
    return not refits


def _check_classes(trained: TrainedModel, run_dir: Path, dataset: Cifar100) -> None:
    if trained.class_names != dataset.class_names:
        raise UserError(
            f"{run_dir}: the model's class names differ from those in "
            f"{dataset.source / 'meta'} (trained on another data set?)"
        )


def predict_runs(
    run_dirs: list[Path],
    models: list[TrainedModel],
    dataset: Cifar100,
    settings: InferenceSettings,
) -> list[np.ndarray]:
    """Each run's test-set logits (N, 100), in the test split's order (``models``: the runs
    loaded on ``settings.device``)."""
    logits = []
    for run_dir, trained in zip(run_dirs, models, strict=True):
        _check_classes(trained, run_dir, dataset)
        logits.append(run_logits(run_dir, trained, dataset.test, "test", settings).numpy())
    return logits


def temperature_scaling(
    models: list[TrainedModel],
    run_dirs: list[Path],
    logits: list[np.ndarray],
    dataset: Cifar100,
    settings: InferenceSettings,
    weights: list[int] | None = None,
) -> tuple[dict[str, Any], list[np.ndarray]]:
    """Each member's T fitted on its validation split; the test set's ECE before and after.
    The members' validation logits (as many TTA views as the test's) come back beside it."""
    labels = dataset.test.labels.numpy()
    members, scaled, val_logits = [], [], []
    for trained, run_dir, member_logits in zip(models, run_dirs, logits, strict=True):
        val, plain, viewed = validation_logits(run_dir, trained, dataset, settings)
        fraction, seed = trained.validation_split
        split = {"split_seed": seed, "val_fraction": fraction, "val_images": len(val)}
        fit = fit_run(checkpoint_path(run_dir), plain, viewed, val.labels, split)
        members.append({"run": str(run_dir), **fit})
        scaled.append(member_logits / fit["temperature"])
        val_logits.append(viewed.numpy())
    before, after = ensemble_probs(logits, weights), ensemble_probs(scaled, weights)
    scaling = {
        "fitted_on": "validation split",
        "members": members,
        "ece_before": calibration(before, labels)["ece"],
        "ece_after": calibration(after, labels)["ece"],
        "nll_before": nll(before, labels),
        "nll_after": nll(after, labels),
    }
    return scaling, val_logits


def validation_accuracy(
    models: list[TrainedModel],
    val_logits: list[np.ndarray],
    dataset: Cifar100,
    weights: list[int] | None = None,
) -> dict[str, float]:
    """Top-1 and top-5 of the runs (averaged as on the test set, same TTA) on the validation
    split they share: what chooses an ensemble's members or its TTA without the test set.
    Empty when their splits differ or one was refit: one run's validation images would be
    another's (or its own) training images, and the figure would flatter the ensemble."""
    splits = {m.validation_split for m in models}
    if len(splits) != 1 or None in splits:
        return {}
    ((fraction, seed),) = splits
    labels = make_splits(dataset, fraction, seed).val.labels.numpy()
    probs = ensemble_probs(val_logits, weights)
    return {
        "val_top1": topk_accuracy(probs, labels, 1),
        "val_top5": topk_accuracy(probs, labels, 5),
    }


def evaluate_runs(
    run_dirs: list[Path],
    models: list[TrainedModel],
    dataset: Cifar100,
    settings: InferenceSettings,
    calibrate: bool = False,
    weights: list[int] | None = None,
) -> tuple[dict[str, Any], np.ndarray]:
    """The report dict (as written to report.json) and the (N, 100) probabilities behind it.

    ``calibrate`` adds temperature scaling (``report["temperature_scaling"]``) and writes
    each run's fitted temperature to RUN/calibration.json. ``weights``: each run's share
    of the average (default: equal).
    """
    logits = predict_runs(run_dirs, models, dataset, settings)
    probs = ensemble_probs(logits, weights)
    labels = dataset.test.labels.numpy()
    first = models[0]
    report = build_report(
        probs, labels, first.class_names, first.superclass_names, first.fine_to_coarse
    )
    names = [str(r) for r in run_dirs]
    report.update(
        {
            "title": run_dirs[0].resolve().name
            if len(run_dirs) == 1
            else f"ensemble of {len(run_dirs)} runs",
            "runs": names,
            "models": [m.metadata["model_name"] for m in models],
            "members": [
                {
                    "run": name,
                    "model": m.metadata["model_name"],
                    "top1": topk_accuracy(softmax(lg), labels, 1),
                    "weight": weight,
                    "precision": precision_name(
                        settings.autocast(m.metadata["config_obj"].train.precision)
                    ),
                }
                for name, m, lg, weight in zip(
                    names, models, logits, weights or [1] * len(names), strict=True
                )
            ],
            "tta_flip": settings.tta_flip,
            "tta_translate": settings.tta_translate,
            "data": str(dataset.source),
            "commit": git_commit(),
            "created": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "split_seeds": [m.metadata["config_obj"].data.split_seed for m in models],
        }
    )
    if calibrate:
        report["temperature_scaling"], val_logits = temperature_scaling(
            models, run_dirs, logits, dataset, settings, weights
        )
        report["ece_calibrated"] = report["temperature_scaling"]["ece_after"]
        report.update(validation_accuracy(models, val_logits, dataset, weights))
    return report, probs


def headline(report: dict[str, Any], out: Path) -> dict[str, Any]:
    """The report's headline figures and where its files are (``evaluate --json``)."""
    files = {kind: str(out / name) for kind, name in report["files"].items()}
    return {**{key: report[key] for key in HEADLINE if key in report}, "report": files}


def summary(report: dict[str, Any]) -> str:
    """The report's headline numbers in a line (two with temperature scaling)."""
    lines = [
        f"{report['title']}: top-1 {report['top1']:.2%}, top-5 {report['top5']:.2%}, "
        f"superclass {report['superclass_accuracy']:.2%}, macro F1 "
        f"{report['macro_f1']:.3f}, ECE {report['ece']:.2%} on {report['images']} test "
        f"images{f' ({tta_note(report)})' if tta_note(report) else ''}"
    ]
    if "selection" in report:
        runs, weights = report["runs"], report["weights"]
        picked = ", ".join(f"{run} x{w}" for run, w in zip(runs, weights, strict=True))
        candidates = len(report["selection"]["candidates"])
        lines.append(f"chosen on the validation split from {candidates} runs: {picked}")
    if "val_top1" in report:
        lines.append(
            f"validation split, same averaging and TTA: top-1 {report['val_top1']:.2%}, "
            f"top-5 {report['val_top5']:.2%}"
        )
    if "temperature_scaling" in report:
        scaling = report["temperature_scaling"]
        temps = ", ".join(f"{m['temperature']:.3f}" for m in scaling["members"])
        lines.append(
            f"temperature scaling (T = {temps}, fitted on the validation split): "
            f"test ECE {scaling['ece_before']:.2%} -> {scaling['ece_after']:.2%}"
        )
    return "\n".join(lines)
