"""A report's files: its figures (confusion matrices, reliability diagram, mistakes,
training curves) and ``report.json``, ``report.md`` with its PNGs, and one self-contained
``report.html``. The numbers are computed in ``cifar100.evaluation.pipeline``; this only writes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cifar100.data.cifar import Cifar100
from cifar100.errors import UserError
from cifar100.evaluation.metrics import misclassified
from cifar100.evaluation.report import plots
from cifar100.evaluation.report.html import render_html
from cifar100.evaluation.report.markdown import render_markdown
from cifar100.runs.folders import read_metrics, write_json
from cifar100.runtime.plotting import curves_figure, png_bytes


def training_curves(run_dir: Path) -> bytes | None:
    """The run's curves.png as written during training, else redrawn from metrics.jsonl."""
    path = run_dir / "curves.png"
    if path.is_file():
        return path.read_bytes()
    rows = read_metrics(run_dir)
    return png_bytes(curves_figure(rows)) if rows else None


def make_figures(
    report: dict[str, Any], probs: np.ndarray, dataset: Cifar100, run_dir: Path
) -> dict[str, bytes]:
    labels = dataset.test.labels.numpy()
    mistakes = misclassified(probs, labels, report["class_names"])
    figures = {
        "confusion": plots.fine_confusion_png(report),
        "superclass_confusion": plots.superclass_confusion_png(report),
        "reliability": plots.reliability_png(report["calibration"]),
    }
    if mistakes:  # a perfect score leaves nothing to show
        figures["misclassified"] = plots.misclassified_png(dataset.test.images, mistakes)
    curves = training_curves(run_dir)
    if curves:
        figures["curves"] = curves
    return figures


def write_report(report: dict[str, Any], figures: dict[str, bytes], out: Path) -> dict[str, Path]:
    """report.json, report.md with its PNGs, and the self-contained report.html."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        for stem, png in figures.items():
            (out / f"{stem}.png").write_bytes(png)
        paths = {
            "json": out / "report.json",
            "markdown": out / "report.md",
            "html": out / "report.html",
        }
        report["files"] = {k: p.name for k, p in paths.items()}
        report["figures"] = [f"{stem}.png" for stem in figures]
        write_json(paths["json"], report)
        paths["markdown"].write_text(render_markdown(report, list(figures)))
        paths["html"].write_text(render_html(report, figures))
    except OSError as error:
        raise UserError(f"{out}: cannot write the report ({error.strerror or error})") from None
    return paths
