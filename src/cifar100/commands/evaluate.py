"""``cifar100 evaluate``: a full test-set report for one run, or an ensemble of several.

Writes ``report.json`` (every number), ``report.md`` (+ its PNG figures) and one
self-contained ``report.html`` into ``RUN_DIR/report/`` or ``--out``.
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

from cifar100.evaluation.inference import PRECISIONS
from cifar100.evaluation.pipeline import default_out, evaluate, headline, summary
from cifar100.recipes.argtypes import positive_int, shift_pixels
from cifar100.recipes.shared_flags import add_shared

PASSED_ON = ("data_dir", "tta", "device", "batch_size", "tta_translate", "select", "precision")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "run_dirs",
        nargs="+",
        type=Path,
        metavar="RUN_DIR",
        help="trained run folder(s); several are evaluated as an ensemble "
        "(their softmax probabilities averaged)",
    )
    add_shared(p, "evaluate", "data_dir")
    p.add_argument(
        "--tta",
        action="store_true",
        help="flip test-time augmentation: average with the mirrored image",
    )
    p.add_argument(
        "--tta-translate",
        type=shift_pixels,
        default=0,
        metavar="N",
        help="also average over the images moved N pixels up-left and down-right "
        "(each mirrored too with --tta): multi-crop TTA; 0 (default): off",
    )
    add_shared(p, "evaluate", "out")
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="run",
        help="run (default): each run at the precision it trained at, as its training "
        "measured it (a head trained on bf16 features scores lower in fp32); or fp32, bf16",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument(
        "--batch-size", type=positive_int, default=500, help="images per inference batch"
    )
    p.add_argument(
        "--no-calibration",
        action="store_true",
        help="skip temperature scaling (fitted on each run's validation split, "
        "never the test set; costs one pass over it)",
    )
    p.add_argument(
        "--select",
        action="store_true",
        help="choose the ensemble's members among the RUN_DIRs on their shared validation "
        "split (greedy forward selection with replacement: a run picked twice weighs "
        "double); the test set takes no part in the choice",
    )
    add_shared(p, "evaluate", "json")


def run(args: argparse.Namespace) -> int:
    out = args.out or default_out(args.run_dirs)
    report = evaluate(
        args.run_dirs,
        out=out,
        calibrate=not args.no_calibration,
        command=shlex.join(args.argv),
        **{key: getattr(args, key) for key in PASSED_ON},
    )
    if args.json:
        print(json.dumps(headline(report, out), indent=2))
    else:
        print(f"{summary(report)}\nreport: {out / report['files']['html']}")
    return 0
