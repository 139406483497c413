"""matplotlib in one place: the file-only pyplot, figures as PNG bytes, the training curves.

Every figure the package draws goes to a file or to bytes, never to a window, so pyplot is
always the Agg backend's. The training curves use the object API instead (no pyplot at
all): ``cifar100.train`` draws them after every epoch, and a notebook that calls it keeps
its own backend.
"""

from __future__ import annotations

import io
from typing import Any


def pyplot(rc: dict[str, Any] | None = None):
    """``matplotlib.pyplot`` on the Agg backend, with ``rc`` applied to its rcParams."""
    import matplotlib

    matplotlib.use("Agg")  # no display: figures go to files and bytes
    import matplotlib.pyplot as plt

    if rc:
        plt.rcParams.update(rc)
    return plt


def png_bytes(fig, dpi: int = 100) -> bytes:
    """``fig`` as PNG bytes on white; a pyplot figure is closed (pyplot keeps it until then)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, facecolor="white")
    if fig.canvas.manager is not None:  # made by pyplot, which holds on to it
        pyplot().close(fig)
    return buffer.getvalue()


def curves_figure(rows: list[dict[str, Any]]):
    """Training curves from metrics.jsonl rows: loss, top-1, top-5 (train and validation)
    and the learning rate, one panel each."""
    from matplotlib.figure import Figure

    x = list(range(1, len(rows) + 1))
    fig = Figure(figsize=(16, 3.6))
    axes = fig.subplots(1, 4)
    for ax, key, title in zip(
        axes[:3], ("loss", "top1", "top5"), ("loss", "top-1", "top-5"), strict=True
    ):
        ax.plot(x, [r[f"train_{key}"] for r in rows], marker=".", label="train")
        if any(f"val_{key}" in r for r in rows):  # a refit validates nothing
            ax.plot(x, [r.get(f"val_{key}") for r in rows], marker=".", label="validation")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.legend()
    axes[3].plot(x, [r["lr"] for r in rows], marker=".")
    axes[3].set_yscale("log")
    axes[3].set_title("learning rate")
    axes[3].set_xlabel("epoch")
    fig.set_layout_engine("tight")
    return fig
