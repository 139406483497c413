"""``cifar100 train``: train a model, evaluate the best checkpoint on the test set.

A run folder that holds a run is never replaced by accident: ``--resume RUN`` continues it
(``--epochs N`` extends it), ``--overwrite`` replaces it, anything else is refused.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cifar100.recipes.flags import RESUME_FLAGS, add_flags, config_from_args, refused_on_resume
from cifar100.recipes.resume import refuse_on_resume, resume_config
from cifar100.runs.folders import results_summary
from cifar100.training.train import new_shared_run_dir, train


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train a model and report its test accuracy", description=__doc__
    )
    add_flags(p, "train")
    p.add_argument(
        "--resume",
        type=Path,
        metavar="RUN_DIR",
        help="continue a run where it stopped, with its own settings; accepts "
        f"only {', '.join(RESUME_FLAGS)}",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.resume:
        refuse_on_resume(args.resume, refused_on_resume(args))
        run_dir = args.resume
        config = resume_config(run_dir, args.epochs, args.device, args.data_dir)
    else:
        config = config_from_args(args, "train")
        run_dir = args.run_dir or new_shared_run_dir(config)  # rank 0's, under torchrun
    results = train(
        config, run_dir, resume=bool(args.resume), command=args.argv, overwrite=args.overwrite
    )
    print(
        json.dumps(results, indent=2) if args.json else f"\n{results_summary(results)} -> {run_dir}"
    )
    return 0
