"""Which test-time augmentation? Validation top-1 of a trained run under each TTA setting.

For a run folder it predicts the run's own validation split (never the test set: this is
how a TTA setting is chosen) with ``predict_logits`` under every combination of
``--flip`` (off, on) and ``--translate`` pixels (default 0, 1, 2), and prints top-1, top-5
and the number of forward passes per image each costs. The chosen setting then goes into
``train.tta_translate`` / ``evaluate --tta-translate``; the test set is read once, by the
run or by ``cifar100 evaluate``.

    python benchmarks/tta_views.py RUN_DIR [--data-dir DIR] [--translate 0 1 2] [--flip on off]
                                   [--doc FILE [--marker NAME]]

``--doc FILE`` also writes the table, as Markdown, between the ``<!-- NAME:start -->`` and
``<!-- NAME:end -->`` lines of FILE (``--marker``, default ``tta``: docs/tta.md), so the
doc's figures are never typed. ``--flip on`` skips the unmirrored settings, which halves
the cost for a large network whose question is only how much the shifts add.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import sys
from pathlib import Path

import torch

from cifar100.data.batches import ImageBatches
from cifar100.data.cifar import load_cifar100, make_splits
from cifar100.evaluation.inference import predict_logits, topk_correct, tta_views
from cifar100.records.table import write_between
from cifar100.runs.folders import cpu_name
from cifar100.runs.trained import load_trained
from cifar100.runtime.allocator import tune_allocator


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="trained run folder")
    parser.add_argument("--data-dir", help="folder holding cifar-100-python/")
    parser.add_argument("--translate", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--flip", nargs="+", choices=["off", "on"], default=["off", "on"])
    parser.add_argument("--doc", type=Path, help="Markdown file with NAME:start/end markers")
    parser.add_argument("--marker", default="tta", help="NAME of the markers in --doc")
    args = parser.parse_args(argv)

    trained = load_trained(args.run_dir)
    data = trained.metadata["config_obj"].data
    dataset = load_cifar100(args.data_dir, download=False)
    val = make_splits(dataset, data.val_fraction, data.split_seed).val
    batches = ImageBatches(val, trained.preprocess, torch.device("cpu"))
    print(f"command: {shlex.join([os.path.basename(sys.executable), *sys.argv])}")
    print(f"date:    {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}")
    print(f"cpu:     {cpu_name()}, torch {torch.__version__}, python {platform.python_version()}")
    print(f"malloc:  {tune_allocator()}")  # load_trained applied it
    print(
        f"run:     {args.run_dir} ({trained.metadata['model_name']}), "
        f"{len(val):,} validation images\n"
    )
    print(f"{'flip':>5} {'shift':>5} {'views':>5} {'val top-1':>9} {'val top-5':>9}")
    rows = []
    for translate in args.translate:
        for flip in (setting == "on" for setting in args.flip):
            logits = predict_logits(
                trained.model, batches, args.batch_size, tta_flip=flip, tta_translate=translate
            )
            top1, top5 = topk_correct(logits, val.labels)
            row = ("yes" if flip else "no", translate, len(tta_views(flip, translate)))
            rows.append((*row, f"{top1 / len(val):.2%}", f"{top5 / len(val):.2%}"))
            print(f"{row[0]:>5} {row[1]:>5} {row[2]:>5} {rows[-1][3]:>9} {rows[-1][4]:>9}")
    if args.doc:
        write_doc_table(args.doc, rows, args.marker)
    return 0


def write_doc_table(path: Path, rows: list[tuple], marker: str = "tta") -> None:
    lines = ["| flip | shift | views | val top-1 | val top-5 |", "|---|--:|--:|--:|--:|"]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    write_between(path, marker, "\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
