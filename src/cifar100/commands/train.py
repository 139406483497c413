"""``cifar100 train``: train a model, evaluate the best checkpoint on the test set.

A run folder that holds a run is never replaced by accident: ``--resume RUN`` continues it
(``--epochs N`` extends it), ``--overwrite`` replaces it, anything else is refused.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cifar100.commands.argtypes import positive_float, positive_int, seed
from cifar100.config import preset_names
from cifar100.limits import PRECISIONS
from cifar100.models import REGISTRY
from cifar100.recipes import from_flags
from cifar100.resume import RESUME_FLAGS, refuse_on_resume, resume_config
from cifar100.runs import new_run_dir, results_summary
from cifar100.training import train


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train a model and report its test accuracy", description=__doc__
    )
    p.add_argument("--model", help=f"{', '.join(sorted(REGISTRY))} (default: the preset's)")
    p.add_argument(
        "--preset",
        help=f"named recipe: {', '.join(preset_names())} "
        "(default: the recipe named like --model, else 'quick')",
    )
    p.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="FILE",
        help="YAML file(s) applied on top of the preset, in order",
    )
    p.add_argument(
        "--epochs",
        type=positive_int,
        help="number of epochs (for pretrained models: of each stage the recipe runs); "
        "with --resume: extend the run to this many",
    )
    p.add_argument(
        "--seed",
        type=seed,
        help="fixes initialisation, shuffling and "
        "augmentation (the validation split has its own data.split_seed)",
    )
    p.add_argument(
        "--train-subset",
        type=positive_int,
        metavar="N",
        help="train on a class-balanced subset of N images (smoke runs)",
    )
    p.add_argument("--data-dir", help="folder holding cifar-100-python/ (or $CIFAR100_DATA)")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument(
        "--run-dir",
        type=Path,
        help="run folder (default: runs/MODEL-TIMESTAMP); "
        "one that holds a run is refused unless --overwrite",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run in --run-dir (never one another process is writing)",
    )
    p.add_argument(
        "--resume",
        type=Path,
        metavar="RUN_DIR",
        help="continue a run where it stopped, with its own settings; accepts "
        f"only {', '.join(RESUME_FLAGS)}",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override any setting, e.g. --set optim.lr=0.01",
    )
    p.add_argument(
        "--teacher",
        nargs="+",
        metavar="RUN",
        help="knowledge distillation: learn the softened probabilities of these trained "
        "runs (or .pt checkpoints; several: an ensemble) besides the labels "
        "(distill.teachers; distill.mode online | cached: see docs/distillation.md)",
    )
    p.add_argument(
        "--kd-temperature",
        type=positive_float,
        metavar="T",
        help="distillation temperature (distill.temperature, default 4)",
    )
    p.add_argument(
        "--kd-weight",
        type=float,
        metavar="W",
        help="weight of the distillation term in [0, 1]; the labels get 1 - W "
        "(distill.weight, default 0.9)",
    )
    p.add_argument(
        "--refit",
        action="store_true",
        default=None,
        help="train on all 50,000 training images (a recipe already validated): no "
        "validation split, the last epoch is the best; the record says refit",
    )
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        help="auto (default): bf16 autocast on CUDA, fp32 elsewhere; bf16 on a CPU pays "
        "only with AMX or AVX512-BF16 (train.precision)",
    )
    p.add_argument("--json", action="store_true", help="print the final metrics as JSON")
    p.set_defaults(func=run)


def resolve_config(args: argparse.Namespace):
    """The run's config from the flags: see ``cifar100.recipes`` for the precedence."""
    return from_flags(
        args.preset,
        args.model,
        args.config,
        args.set,
        args.epochs,
        seed=args.seed,
        train_subset=args.train_subset,
        data_dir=args.data_dir,
        device=args.device,
        refit=args.refit,
        teachers=args.teacher,
        kd_temperature=args.kd_temperature,
        kd_weight=args.kd_weight,
        precision=args.precision,
    )


def run(args: argparse.Namespace) -> int:
    if args.resume:
        refuse_on_resume(
            args.resume,
            {
                "--model": args.model,
                "--preset": args.preset,
                "--config": args.config,
                "--seed": args.seed,
                "--train-subset": args.train_subset,
                "--run-dir": args.run_dir,
                "--overwrite": args.overwrite,
                "--set": args.set,
                "--refit": args.refit,
                "--teacher": args.teacher,
                "--kd-temperature": args.kd_temperature,
                "--kd-weight": args.kd_weight,
                "--precision": args.precision,
            },
        )
        run_dir = args.resume
        config = resume_config(run_dir, args.epochs, args.device, args.data_dir)
    else:
        config = resolve_config(args)
        run_dir = args.run_dir or new_run_dir("runs", config.model.name)
    results = train(
        config, run_dir, resume=bool(args.resume), command=args.argv, overwrite=args.overwrite
    )
    print(
        json.dumps(results, indent=2) if args.json else f"\n{results_summary(results)} -> {run_dir}"
    )
    return 0
