"""What the data set holds: the summary and the grid of samples ``cifar100 data info`` shows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cifar100.config.schema import AugmentConfig
from cifar100.data.augment import augment_batch, to_float
from cifar100.data.cifar import Cifar100, DataError, make_splits
from cifar100.runtime.plotting import pyplot


def summarize(dataset: Cifar100, seed: int, val_fraction: float) -> dict:
    """Counts, shapes, class and superclass names, and the sizes of the split ``seed`` draws."""
    splits = make_splits(dataset, val_fraction, seed)
    return {
        "source": str(dataset.source),
        "train_images": len(dataset.train),
        "test_images": len(dataset.test),
        "split": {"train": len(splits.train), "val": len(splits.val), "seed": seed},
        "image_shape": list(dataset.train.images.shape[1:]),
        "num_classes": len(dataset.class_names),
        "num_superclasses": len(dataset.superclass_names),
        "per_class_train": int(torch.bincount(dataset.train.labels).min()),
        "per_class_test": int(torch.bincount(dataset.test.labels).min()),
        "class_names": dataset.class_names,
        "superclass_names": dataset.superclass_names,
    }


def describe(summary: dict, dataset: Cifar100) -> str:
    """``summary`` as text: counts, the split, each superclass with its classes, the grid."""
    lines = [
        f"CIFAR-100 from {summary['source']}",
        f"  train {summary['train_images']} images ({summary['per_class_train']} per "
        f"class), test {summary['test_images']} ({summary['per_class_test']} per class)",
        f"  split (seed {summary['split']['seed']}): {summary['split']['train']} train / "
        f"{summary['split']['val']} validation",
        f"  {summary['num_classes']} classes in {summary['num_superclasses']} superclasses:",
    ]
    coarse = dataset.fine_to_coarse().tolist()
    for i, name in enumerate(summary["superclass_names"]):
        members = [dataset.class_names[c] for c in range(len(coarse)) if coarse[c] == i]
        lines.append(f"    {name}: {', '.join(members)}")
    if "grid" in summary:
        lines.append(f"  sample grid: {summary['grid']}")
    return "\n".join(lines)


def _grid_rows(dataset: Cifar100, per_class: int, augmented: bool, seed: int):
    """Classes ordered by superclass, and one (32, 32 * per_class, 3) strip for each."""
    generator = torch.Generator().manual_seed(seed)
    coarse = dataset.fine_to_coarse().tolist()
    classes = sorted(range(len(dataset.class_names)), key=lambda c: (coarse[c], c))
    labels = dataset.train.labels.numpy()  # numpy: 100 masks in torch crawl on busy cores
    rows = []
    for cls in classes:
        idx = torch.from_numpy(np.flatnonzero(labels == cls)[:per_class])
        images = to_float(dataset.train.images[idx])
        if augmented:
            images = augment_batch(
                images, AugmentConfig(rotation=15, zoom=0.1, contrast=0.2), generator
            )
        rows.append(torch.cat(list(images.permute(0, 2, 3, 1)), dim=1))  # (32, 32*k, 3)
    return classes, rows


def sample_grid(dataset: Cifar100, path: Path, per_class: int, augmented: bool, seed: int) -> Path:
    """PNG: one row per class (ordered by superclass), ``per_class`` images each."""
    plt = pyplot()
    try:  # fail before drawing 100 rows, not after
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DataError(f"{path}: cannot write the sample grid ({error.strerror})") from None
    classes, rows = _grid_rows(dataset, per_class, augmented, seed)
    fig, axes = plt.subplots(len(rows), 1, figsize=(per_class * 0.45 + 2, len(rows) * 0.45))
    for ax, cls, row in zip(axes, classes, rows, strict=True):
        ax.imshow(row.numpy())
        ax.set_axis_off()
        ax.text(-4, 16, dataset.class_names[cls], ha="right", va="center", fontsize=7)
    fig.subplots_adjust(left=0.25, right=0.99, top=0.995, bottom=0.005, hspace=0.05)
    try:
        fig.savefig(path, dpi=80)
    except OSError as error:
        raise DataError(f"{path}: cannot write the sample grid ({error.strerror})") from None
    finally:
        plt.close(fig)
    return path
