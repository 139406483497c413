"""``cifar100 models``: the registry, with parameters and FLOPs per image."""

from __future__ import annotations

import argparse
import json

from cifar100.models.catalog import describe, table
from cifar100.recipes.shared_flags import add_shared

DESCRIPTION = None  # its --help shows the usage and flags only


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_shared(p, "models", "json")


def run(args: argparse.Namespace) -> int:
    rows = describe()
    print(json.dumps(rows, indent=2) if args.json else table(rows))
    return 0
