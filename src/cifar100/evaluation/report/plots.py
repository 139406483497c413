"""Figures of the evaluation report, each returned as PNG bytes (embedded in HTML, saved
beside report.md), and their titles and captions. Drawn through ``cifar100.runtime.plotting``."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from cifar100.runtime.plotting import png_bytes, pyplot

INK, MUTED, ACCENT, WRONG = "#1f2937", "#6b7280", "#2563eb", "#dc2626"
RC = {
    "font.size": 9,
    "axes.edgecolor": MUTED,
    "axes.labelcolor": INK,
    "xtick.color": INK,
    "ytick.color": INK,
    "axes.spines.top": False,
    "axes.spines.right": False,
}

# (file stem, section title, what the figure shows)
FIGURES = {
    "confusion": (
        "Confusion matrix",
        "Row-normalised: each row is one true class and sums to "
        "100%. Classes are grouped by superclass; the square-root colour scale keeps "
        "small confusions visible.",
    ),
    "superclass_confusion": (
        "Superclass confusion",
        "A fine prediction mapped to its superclass, against the true superclass.",
    ),
    "misclassified": (
        "Misclassified test images",
        "The most confident mistakes, one per "
        "true class: true class, then → predicted class (confidence).",
    ),
    "reliability": (
        "Calibration",
        "Accuracy against confidence in equal-width bins; bars "
        "below the diagonal mean over-confidence.",
    ),
    "curves": ("Training curves", "From the run's metrics.jsonl."),
}


def _row_normalise(matrix: np.ndarray) -> np.ndarray:
    totals = matrix.sum(axis=1, keepdims=True)
    return np.divide(matrix, totals, out=np.zeros(matrix.shape), where=totals > 0)


def _group_spans(groups: list[int]) -> list[tuple[int, int, int]]:
    """(group, first index, last index) for each run of equal values in ``groups``."""
    spans, start = [], 0
    for i in range(1, len(groups) + 1):
        if i == len(groups) or groups[i] != groups[start]:
            spans.append((groups[start], start, i - 1))
            start = i
    return spans


def fine_confusion_png(report: dict[str, Any]) -> bytes:
    """100x100 row-normalised confusion matrix, classes grouped and labelled by superclass.

    A square-root colour scale keeps the 1-5% confusions visible next to a bright diagonal;
    the axes are placed in inches so that the matrix, not white margin, fills the image.
    """
    from matplotlib.colors import LinearSegmentedColormap, PowerNorm

    plt = pyplot(RC)
    order = report["class_order"]
    matrix = _row_normalise(np.asarray(report["confusion_matrix"])[np.ix_(order, order)])
    names = [report["class_names"][c] for c in order]
    groups = [report["fine_to_coarse"][c] for c in order]
    n = len(order)
    side, left, bottom, right, top = 10.2, 1.9, 1.2, 1.1, 0.15  # inches
    width, height = left + side + right, bottom + side + top
    fig = plt.figure(figsize=(width, height))
    ax = fig.add_axes((left / width, bottom / height, side / width, side / height))
    cmap = LinearSegmentedColormap.from_list(
        "white_blue", ["#ffffff", "#bfdbfe", "#3b82f6", "#1e3a8a", "#0b1026"]
    )
    image = ax.imshow(
        matrix,
        cmap=cmap,
        norm=PowerNorm(0.5, vmin=0, vmax=1),
        interpolation="nearest",
        aspect="auto",
    )
    ax.set_xticks(range(n), names, rotation=90, fontsize=7)
    ax.set_yticks(range(n), names, fontsize=7)
    ax.tick_params(length=0, pad=2)
    for _, first, _last in _group_spans(groups)[1:]:
        ax.axhline(first - 0.5, color="#cbd5e1", lw=0.6)
        ax.axvline(first - 0.5, color="#cbd5e1", lw=0.6)
    _label_superclasses(ax, groups, report["superclass_names"])
    ax.set_xlabel("predicted class", labelpad=6)
    bar_ax = fig.add_axes(
        ((left + side + 0.15) / width, bottom / height, 0.18 / width, side / height)
    )
    bar = fig.colorbar(image, cax=bar_ax, ticks=[0, 0.01, 0.05, 0.1, 0.25, 0.5, 1])
    bar.ax.set_yticklabels(["0", "1%", "5%", "10%", "25%", "50%", "100%"])
    bar.set_label("share of the true class (row)")
    return png_bytes(fig, dpi=100)


def _label_superclasses(ax, groups: list[int], superclass_names: list[str]) -> None:
    """Superclass names left of the class tick labels, wrapped, in alternating colours."""
    import textwrap

    for k, (group, first, last) in enumerate(_group_spans(groups)):
        name = textwrap.fill(superclass_names[group].replace("_", " "), 16)
        ax.annotate(
            name,
            xy=(0, (first + last) / 2),
            xycoords=("axes fraction", "data"),
            xytext=(-60, 0),
            textcoords="offset points",
            ha="right",
            va="center",
            fontsize=7.5,
            linespacing=1.0,
            color=INK if k % 2 == 0 else ACCENT,
            annotation_clip=False,
        )


def superclass_confusion_png(report: dict[str, Any]) -> bytes:
    """20x20 row-normalised superclass matrix with the percentages written in."""
    plt = pyplot(RC)
    counts = np.asarray(report["superclass_confusion_matrix"])
    matrix = _row_normalise(counts)
    names = [name.replace("_", " ") for name in report["superclass_names"]]
    n = len(names)
    fig, ax = plt.subplots(figsize=(10, 9))
    ax.imshow(matrix, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    for i in range(n):
        for j in range(n):
            if counts[i, j]:
                ax.text(
                    j,
                    i,
                    f"{100 * matrix[i, j]:.0f}",
                    ha="center",
                    va="center",
                    fontsize=6.5,
                    color="white" if matrix[i, j] > 0.5 else INK,
                )
    ax.set_xticks(range(n), names, rotation=60, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(n), names)
    ax.tick_params(length=0)
    ax.set_xlabel("predicted superclass (fine prediction mapped up)")
    ax.set_ylabel("true superclass")
    ax.set_title("superclass confusion (% of the true superclass)", color=INK)
    fig.tight_layout()
    return png_bytes(fig)


def reliability_png(calibration: dict[str, Any]) -> bytes:
    """Reliability diagram (accuracy per confidence bin) above the confidence histogram."""
    plt = pyplot(RC)
    bins = calibration["bins"]
    centres = np.array([(b["lo"] + b["hi"]) / 2 for b in bins])
    width = bins[0]["hi"] - bins[0]["lo"]
    acc = np.array([b["accuracy"] for b in bins])
    conf = np.array([b["confidence"] for b in bins])
    counts = np.array([b["count"] for b in bins])
    used = counts > 0  # an empty bin has no accuracy to draw
    centres_used, acc, conf = centres[used], acc[used], conf[used]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(5.6, 6), height_ratios=(3, 1), sharex=True)
    top.bar(centres_used, acc, width=width * 0.95, color=ACCENT, label="accuracy")
    gap_base = np.minimum(acc, conf)
    top.bar(
        centres_used,
        np.abs(conf - acc),
        bottom=gap_base,
        width=width * 0.95,
        facecolor="none",
        hatch="///",
        edgecolor=WRONG,
        lw=0.8,
        label="gap to confidence",
    )
    top.plot([0, 1], [0, 1], "--", color=MUTED, lw=1, label="perfect calibration")
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.set_title(
        f"reliability: ECE {100 * calibration['ece']:.2f}% ({calibration['num_bins']} bins)",
        color=INK,
    )
    top.legend(loc="upper left", frameon=False)
    bottom.bar(centres, counts, width=width * 0.95, color=MUTED)
    bottom.set_xlim(0, 1)
    bottom.set_xlabel("confidence (top probability)")
    bottom.set_ylabel("images")
    fig.tight_layout()
    return png_bytes(fig)


def misclassified_png(
    images: torch.Tensor, mistakes: list[dict[str, Any]], columns: int = 8
) -> bytes:
    """Grid of wrongly classified test images, each titled true -> predicted (confidence).

    ``images`` is the test split (N, 3, 32, 32) uint8; each mistake has ``index``, ``true``,
    ``predicted`` and ``confidence``.
    """
    plt = pyplot(RC)
    rows = max(1, -(-len(mistakes) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 1.6, rows * 2.05), squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, mistake in zip(axes.flat, mistakes, strict=False):
        ax.imshow(images[mistake["index"]].permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set_title(
            f"{mistake['true']}\n→ {mistake['predicted']} ({100 * mistake['confidence']:.0f}%)",
            fontsize=8.5,
            color=INK,
            pad=3,
        )
    fig.subplots_adjust(left=0.01, right=0.99, top=0.93, bottom=0.01, hspace=0.55, wspace=0.1)
    return png_bytes(fig)
