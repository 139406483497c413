"""The ``cifar100`` command: one subcommand per module in ``cifar100.commands``."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import NoReturn

from cifar100.errors import UserError

# Each module defines register(subparsers) and sets ``func`` on its parser.
COMMANDS = ["data", "models", "train", "evaluate", "compare", "predict", "export", "tune"]


class Parser(argparse.ArgumentParser):
    """A usage mistake ends in one line, like every other error; subcommands inherit it."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"cifar100: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="cifar100", description="Train, evaluate, compare and ship CIFAR-100 classifiers.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"cifar100.commands.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = ["cifar100", *(sys.argv[1:] if argv is None else argv)]  # for run.json
    try:
        return args.func(args) or 0
    except UserError as error:
        code = 130 if type(error).__name__ == "TrainingInterrupted" else 1
        print(f"cifar100: error: {error}", file=sys.stderr)
        return code
    except KeyboardInterrupt:
        print("cifar100: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
