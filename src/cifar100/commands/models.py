"""``cifar100 models``: the registry, with parameters and FLOPs per image."""

from __future__ import annotations

import argparse
import json

from cifar100.config import ModelConfig
from cifar100.models import REGISTRY, build_model, count_flops, count_parameters


def register(subparsers) -> None:
    p = subparsers.add_parser("models", help="list the models: input size, parameters, FLOPs")
    p.add_argument("--json", action="store_true", help="print the table as JSON")
    p.set_defaults(func=run)


def describe() -> list[dict]:
    rows = []
    for name, spec in sorted(REGISTRY.items()):
        model = build_model(ModelConfig(name=name))
        rows.append({"name": name, "input_size": spec.input_size,
                     "parameters": count_parameters(model),
                     "mflops_per_image": round(count_flops(model, spec.input_size) / 1e6, 1),
                     "mean": spec.mean, "std": spec.std, "pretrained": spec.pretrained,
                     "description": spec.description})
    return rows


def run(args: argparse.Namespace) -> int:
    rows = describe()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    width = max(len("model"), *(len(row["name"]) for row in rows))
    print(f"{'model':<{width}} {'input':>5} {'params':>11} {'MFLOPs/img':>10}  description")
    for row in rows:
        print(f"{row['name']:<{width}} {row['input_size']:>5} {row['parameters']:>11,} "
              f"{row['mflops_per_image']:>10}  {row['description']}")
    return 0
