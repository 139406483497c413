"""The coursework's results table ("Custom CNN ~XX%, MobileNetV2 ~XX%"), filled from run
records: each row sets the coursework's own recipe beside the project's best record for the
same kind of model, so a reader sees what the recipe gives and what the project adds.
"""

from __future__ import annotations

from typing import Any

# (row, the preset that follows the coursework's recipe, models the project may answer with)
ROWS = [
    ("Custom CNN (from scratch)", "cnn-seed", ("cnn-seed", "cnn-fast", "resnet18")),
    ("MobileNetV2 (ImageNet transfer)", "mobilenetv2-seed", ("mobilenetv2",)),
]
HEADER = (
    "| Coursework row | Its recipe, measured | Time | The project's best for it | Time |\n"
    "|---|--:|--:|--:|--:|\n"
)


def _result(record: dict[str, Any] | None) -> tuple[str, str]:
    if record is None:
        return "not recorded yet", ""
    minutes = record.get("train_minutes") or 0.0
    time = f"{minutes:.0f} min" if minutes < 60 else f"{minutes / 60:.1f} h"
    return f"{100 * record['test_top1']:.2f}% (`{record.get('name') or record['model']}`)", time


def coursework_table(records: list[dict[str, Any]]) -> str:
    """Markdown rows: the coursework recipe's record (named after its preset) and the best
    other single-model record of the same kinds, by test top-1. Ensembles and distilled
    students are left out: the rows compare one model trained on the labels alone (a
    student's teacher was itself pre-trained, which "from scratch" rules out)."""
    lines = []
    for label, preset, models in ROWS:
        seed = next((r for r in records if r.get("name") == preset), None)
        others = [
            r
            for r in records
            if r.get("model") in models
            and r is not seed
            and "members" not in r
            and not r.get("distill")
        ]
        best = max(others, key=lambda r: r["test_top1"], default=None)
        lines.append(f"| {label} | {' | '.join(_result(seed))} | {' | '.join(_result(best))} |")
    return HEADER + "\n".join(lines) + "\n"
