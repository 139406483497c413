"""``cifar100 compare``: the results table, from run directories or committed run records.

A *run record* is a small JSON file (``results/NAME.json``) that keeps what a run showed
without its weights: metrics, resolved config, commit, hardware, wall time, command.
``--record RUN_DIR --to FILE`` writes one. ``--readme FILE`` (repeatable) puts each
generated table between its markers in FILE, wherever FILE has them: every record between
``<!-- results:start -->`` and ``<!-- results:end -->``, the best record of each model family
on each kind of hardware between ``<!-- headline:start -->`` and ``<!-- headline:end -->``,
the coursework's table between ``<!-- coursework:start -->`` and ``<!-- coursework:end -->``.
So the project's tables are generated, never typed:

    cifar100 compare results/*.json --readme README.md --readme docs/index.md \\
        --readme docs/results.md
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cifar100.errors import UserError
from cifar100.recipes.shared_flags import add_shared
from cifar100.records.record import write_record
from cifar100.records.table import END, HEADLINE_END, HEADLINE_START, START, write_tables

FORMATTER = argparse.RawDescriptionHelpFormatter  # the example keeps its lines


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "inputs",
        nargs="*",
        type=Path,
        metavar="RUN_DIR_OR_RECORD",
        help="run directories (results.json, run.json, config.yaml) or run "
        "record JSON files, one table row each, in this order",
    )
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    add_shared(p, "compare", "out")
    p.add_argument(
        "--readme",
        type=Path,
        action="append",
        metavar="FILE",
        help=f"replace the text between {START} and {END} in FILE with the table, and "
        f"between {HEADLINE_START} and {HEADLINE_END} with the headline table (repeatable)",
    )
    p.add_argument(
        "--record",
        type=Path,
        metavar="RUN_DIR",
        help="write a run record of RUN_DIR (needs --to) instead of a table",
    )
    p.add_argument(
        "--to", type=Path, metavar="FILE", help="where --record writes, e.g. results/cnn-seed.json"
    )
    p.add_argument("--name", help="the record's name in the table (default: --to's stem)")


def run(args: argparse.Namespace) -> int:
    if args.record:
        if not args.to:
            raise UserError("compare --record RUN_DIR needs --to FILE (e.g. results/NAME.json)")
        record = write_record(args.record, args.to, args.name)
        print(
            f"record of {args.record} ({record['model']}, test top-1 "
            f"{record['test_top1']:.2%}) -> {args.to}"
        )
        return 0
    if not args.inputs:
        raise UserError("compare: give at least one run directory or run record")
    table = write_tables(args.inputs, args.markdown, args.readme, args.out)
    for readme in args.readme or []:
        print(f"updated the results tables in {readme}")
    print(table, end="")
    return 0
