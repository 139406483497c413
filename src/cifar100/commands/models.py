"""``cifar100 models``: the registry, with parameters and FLOPs per image."""

from __future__ import annotations

import argparse
import json

from cifar100.models.catalog import describe, table


def register(subparsers) -> None:
    p = subparsers.add_parser("models", help="list the models: input size, parameters, FLOPs")
    p.add_argument("--json", action="store_true", help="print the table as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    rows = describe()
    print(json.dumps(rows, indent=2) if args.json else table(rows))
    return 0
