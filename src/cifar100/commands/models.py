"""``cifar100 models``: the registry, with parameters and FLOPs per image, what each
pretrained backbone costs at other input sizes, and what each model has reached in the
records of a results folder."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cifar100.models.catalog import describe, table
from cifar100.recipes.argtypes import positive_int
from cifar100.recipes.shared_flags import add_shared
from cifar100.records.record import load_record
from cifar100.records.table import reached

DESCRIPTION = None  # its --help shows the usage and flags only


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--sizes",
        nargs="+",
        type=positive_int,
        default=[160, 224, 260],
        metavar="PX",
        help="input sizes at which each pretrained backbone's FLOPs per image are shown "
        "(default: 160 224 260)",
    )
    p.add_argument(
        "--results",
        type=Path,
        default=Path("results"),
        metavar="DIR",
        help="folder of run records (*.json): each model's best test top-1 per kind of "
        "hardware is shown (default: results/, where there is one)",
    )
    add_shared(p, "models", "json")


def run(args: argparse.Namespace) -> int:
    rows = describe(args.sizes)
    folder = args.results
    records = (
        [load_record(path) for path in sorted(folder.glob("*.json"))] if folder.is_dir() else []
    )
    best = reached(records)
    for row in rows:
        if row["name"] in best:
            row["reached"] = best[row["name"]]
    print(json.dumps(rows, indent=2) if args.json else table(rows))
    return 0
