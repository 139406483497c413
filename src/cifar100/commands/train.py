"""``cifar100 train``: train a model, evaluate the best checkpoint on the test set.

A run folder that holds a run is never replaced by accident: ``--resume RUN`` continues it
(``--epochs N`` extends it), ``--overwrite`` replaces it, anything else is refused.
"""

from __future__ import annotations

import argparse
import json

from cifar100.recipes.flags import add_flags
from cifar100.recipes.resume import config_and_run_dir
from cifar100.runs.folders import results_summary
from cifar100.training.train import train


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_flags(p, "train")  # and --resume


def run(args: argparse.Namespace) -> int:
    config, run_dir = config_and_run_dir(args)
    results = train(
        config, run_dir, resume=bool(args.resume), command=args.argv, overwrite=args.overwrite
    )
    print(
        json.dumps(results, indent=2) if args.json else f"\n{results_summary(results)} -> {run_dir}"
    )
    return 0
