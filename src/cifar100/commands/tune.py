"""``cifar100 tune``: search hyperparameters with Optuna on the validation split.

The study lives in STUDY_DIR/study.db: rerun the same command after a crash, or start
more workers on the same folder, and they carry on with the same study.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cifar100.commands.argtypes import positive_float, positive_int, seed
from cifar100.config import preset_names
from cifar100.recipes import from_flags


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "tune", help="search hyperparameters (Optuna, validation only)", description=__doc__
    )
    p.add_argument(
        "--trials",
        type=positive_int,
        default=20,
        help="finished trials the study should hold; a rerun tops it up (default 20)",
    )
    p.add_argument(
        "--study-dir",
        type=Path,
        help="folder for study.db, trials/, summary and best.yaml (default: studies/PRESET)",
    )
    p.add_argument(
        "--preset",
        default="quick",
        help=f"base recipe to search around: {', '.join(preset_names())} (default: quick)",
    )
    p.add_argument(
        "--epochs",
        type=positive_int,
        help="epochs per trial (per stage for the pretrained models; default: the preset's)",
    )
    p.add_argument(
        "--train-subset",
        type=positive_int,
        metavar="N",
        help="train each trial on a class-balanced subset of N images",
    )
    p.add_argument("--data-dir", help="folder holding cifar-100-python/ (or $CIFAR100_DATA)")
    p.add_argument(
        "--timeout",
        type=positive_float,
        metavar="MIN",
        help="start no new trial after this many minutes",
    )
    p.add_argument("--seed", type=seed, default=0, help="seed of the sampler (default 0)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="change the base recipe, e.g. --set train.batch_size=128",
    )
    p.set_defaults(func=run)


def base_config(args: argparse.Namespace):
    """The recipe every trial starts from: the same resolver as ``train`` (--epochs too)."""
    return from_flags(
        args.preset,
        sets=args.set,
        epochs=args.epochs,
        train_subset=args.train_subset,
        data_dir=args.data_dir,
    )


def run(args: argparse.Namespace) -> int:
    from cifar100 import tune, tune_report

    tune.require_optuna()
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per trial is ours
    tune.quiet_interrupts()
    base = base_config(args)  # before any folder is made: a bad option leaves nothing
    study_dir = args.study_dir or Path("studies") / args.preset
    study = tune.run_study(
        study_dir,
        base,
        args.trials,
        args.timeout,
        args.seed,
        on_trial=lambda _, trial: print(tune_report.trial_line(trial), flush=True),
    )
    print(
        f"\n{tune_report.finished(study)} finished trials in {study_dir / 'study.db'}; "
        f"summary: {study_dir / 'summary.md'}"
    )
    if tune_report.best_config(study) is None:
        print("no trial completed yet: no best.yaml")
        return 0
    best = study.best_trial
    print(
        f"best: trial {best.number}, validation top-1 {best.value:.2%}, "
        + ", ".join(f"{k}={v:.3g}" for k, v in best.params.items())
    )
    print(f"train it: cifar100 train --config {study_dir / 'best.yaml'}")
    return 0
