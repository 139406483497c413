"""``cifar100 tune``: search hyperparameters with Optuna on the validation split.

The study lives in STUDY_DIR/study.db, or in the database --storage names: rerun the same
command after a crash, or start more workers on the same study (the same folder, or the same
--storage from other machines), and they carry on with the same study.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cifar100.recipes.argtypes import positive_float, positive_int
from cifar100.recipes.flags import add_flags, config_from_args
from cifar100.recipes.shared_flags import add_shared


def add_arguments(p: argparse.ArgumentParser) -> None:
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
        "--storage",
        metavar="URL",
        help="database holding the study, shared by workers on several machines, e.g. "
        "postgresql://USER:PASSWORD@HOST/DATABASE (default: STUDY_DIR/study.db, SQLite)",
    )
    add_flags(p, "tune")
    p.set_defaults(preset="quick")
    p.add_argument(
        "--timeout",
        type=positive_float,
        metavar="MIN",
        help="start no new trial after this many minutes",
    )
    add_shared(p, "tune", "seed")


def run(args: argparse.Namespace) -> int:
    from cifar100.tuning import report, search

    search.quiet_interrupts()  # one line per trial is ours
    base = config_from_args(args, "tune")  # before any folder is made: a bad option leaves nothing
    study_dir = args.study_dir or Path("studies") / args.preset
    study = search.run_study(
        study_dir,
        base,
        args.trials,
        args.timeout,
        args.seed,
        on_trial=lambda _, trial: print(report.trial_line(trial), flush=True),
        storage=args.storage,
    )
    print(report.outcome(study, study_dir, search.storage_label(study_dir, args.storage)))
    return 0
