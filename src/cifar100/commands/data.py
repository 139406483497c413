"""``cifar100 data info``: what the data set holds, its split, and a grid of samples."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cifar100.data.cifar import load_cifar100
from cifar100.data.summary import describe, sample_grid, summarize
from cifar100.recipes.argtypes import fraction, positive_int
from cifar100.recipes.shared_flags import add_shared

DESCRIPTION = None  # its --help shows the usage and flags only


def add_arguments(p: argparse.ArgumentParser) -> None:
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    info = actions.add_parser("info", help="counts, class names, split sizes, sample grid")
    add_shared(info, "data", "data_dir", "seed")
    info.add_argument(
        "--val-fraction",
        type=fraction,
        default=0.2,
        help="share of the training images set aside for validation",
    )
    info.add_argument(
        "--grid",
        type=Path,
        default=Path("runs/data-samples.png"),
        help="where to write the PNG grid of samples (one row per class)",
    )
    info.add_argument(
        "--per-class", type=positive_int, default=8, help="images per class in the grid"
    )
    info.add_argument(
        "--augmented",
        action="store_true",
        help="show augmented views (the cnn-seed recipe's augmentation)",
    )
    add_shared(info, "data", "json")
    info.set_defaults(func=run_info)


def run_info(args: argparse.Namespace) -> int:
    dataset = load_cifar100(args.data_dir)
    summary = summarize(dataset, args.seed, args.val_fraction)
    grid = sample_grid(dataset, args.grid, args.per_class, args.augmented, args.seed)
    summary["grid"] = str(grid)
    print(json.dumps(summary, indent=2) if args.json else describe(summary, dataset))
    return 0
