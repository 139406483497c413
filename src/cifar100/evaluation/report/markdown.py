"""The evaluation report as Markdown (``report.md``), its figures linked as the PNG files
beside it; and the wording both report pages share."""

from __future__ import annotations

from typing import Any

from cifar100.evaluation.metrics import tta_note
from cifar100.evaluation.report.plots import FIGURES


def pct(value: float) -> str:
    """0.1234 -> "12.34%", as every number in both report pages."""
    return f"{100 * value:.2f}%"


def _md_report(report: dict[str, Any], label: str) -> list[str]:
    lines = [f"| {label} | precision | recall | F1 | support |", "|---|--:|--:|--:|--:|"]
    for row in report["classes"]:
        lines.append(
            f"| {row['name']} | {row['precision']:.3f} | {row['recall']:.3f} | "
            f"{row['f1']:.3f} | {row['support']} |"
        )
    lines.append(
        f"| **accuracy** | | | {report['accuracy']:.3f} | {report['macro_avg']['support']} |"
    )
    for key, name in (("macro_avg", "macro avg"), ("weighted_avg", "weighted avg")):
        avg = report[key]
        lines.append(
            f"| **{name}** | {avg['precision']:.3f} | {avg['recall']:.3f} | "
            f"{avg['f1']:.3f} | {avg['support']} |"
        )
    return lines


def scaling_note(report: dict[str, Any]) -> str:
    """One sentence on temperature scaling: T, where it was fitted, ECE before and after."""
    scaling = report["temperature_scaling"]
    members = scaling["members"]
    temps = ", ".join(f"{m['temperature']:.3f}" for m in members)
    seeds = ", ".join(str(m["split_seed"]) for m in members)
    return (
        f"Temperature scaling: T = {temps}, fitted on the validation split (split seed "
        f"{seeds}, {sum(m['val_images'] for m in members):,} images; never the test set); "
        f"test ECE {pct(scaling['ece_before'])} before, {pct(scaling['ece_after'])} after, "
        f"test NLL {scaling['nll_before']:.3f} before, {scaling['nll_after']:.3f} after."
    )


def _md_scaling(report: dict[str, Any]) -> list[str]:
    if "temperature_scaling" not in report:
        return []
    after = report["temperature_scaling"]["ece_after"]
    return [f"| ECE after temperature scaling | {pct(after)} |", "", scaling_note(report)]


def render_markdown(report: dict[str, Any], figures: list[str]) -> str:
    """Markdown twin of the page; figures are linked as the PNG files beside it."""
    runs = ", ".join(f"`{r}`" for r in report["runs"])
    lines = (
        [
            f"# CIFAR-100 evaluation: {report['title']}",
            "",
            f"Runs {runs}; {report['images']} test images from `{report['data']}`; "
            f"{tta_note(report) or 'no TTA'}; made {report['created']} "
            f"at commit `{report.get('commit')}`.",
            "",
            "| metric | value |",
            "|---|--:|",
            f"| top-1 accuracy | {pct(report['top1'])} |",
            f"| top-5 accuracy | {pct(report['top5'])} |",
            f"| superclass accuracy | {pct(report['superclass_accuracy'])} |",
            f"| macro F1 | {report['macro_f1']:.3f} |",
            f"| expected calibration error (15 bins) | {pct(report['ece'])} |",
            f"| test loss (NLL) | {report['nll']:.3f} |",
        ]
        + _md_scaling(report)
        + [""]
    )
    for stem in figures:
        lines += [f"## {FIGURES[stem][0]}", "", FIGURES[stem][1], "", f"![{stem}]({stem}.png)", ""]
    lines += [
        "## Most confused pairs",
        "",
        "| true class | predicted as | images | share |",
        "|---|---|--:|--:|",
    ]
    lines += [
        f"| {p['true']} | {p['predicted']} | {p['count']} | {pct(p['share'])} |"
        for p in report["most_confused"]
    ]
    lines += ["", "## Superclass report", ""] + _md_report(
        report["superclass_report"], "superclass"
    )
    lines += ["", "## Per-class report", ""] + _md_report(report["classification_report"], "class")
    return "\n".join(lines) + "\n"
