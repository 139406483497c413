"""The ``cifar100`` command: one subcommand per module in ``cifar100.commands``."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import NoReturn

from cifar100.errors import UserError
from cifar100.runtime import stopping
from cifar100.runtime.allocator import tune_allocator

# Each command, with its line in ``cifar100 --help``. Its module in ``cifar100.commands``
# gives the rest: the docstring (the command's description, unless the module sets
# DESCRIPTION), add_arguments(parser), and run(args), which returns the exit code (a module
# without run gives its sub-commands their own).
COMMANDS = {
    "data": "inspect the data set",
    "models": "list the models: input size, parameters, FLOPs",
    "train": "train a model and report its test accuracy",
    "evaluate": "test-set report: metrics, confusion, calibration",
    "compare": "results table from runs or run records",
    "predict": "top-K classes of any image file",
    "export": "export a trained run to ONNX / safetensors / a model-hub folder",
    "serve": "the demo page: drop a photo, see the top-5",
    "tune": "search hyperparameters (Optuna, validation only)",
}


class Parser(argparse.ArgumentParser):
    """A usage mistake ends in one line, like every other error; subcommands inherit it."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"cifar100: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="cifar100", description="Train, evaluate, compare and ship CIFAR-100 classifiers."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, summary in COMMANDS.items():
        module = importlib.import_module(f"cifar100.commands.{name}")
        add_command(subparsers, name, summary, module)
    return parser


def add_command(subparsers, name: str, summary: str, module) -> None:
    parser = subparsers.add_parser(
        name,
        help=summary,
        description=getattr(module, "DESCRIPTION", module.__doc__),
        formatter_class=getattr(module, "FORMATTER", argparse.HelpFormatter),
    )
    module.add_arguments(parser)
    if hasattr(module, "run"):
        parser.set_defaults(func=module.run)


def main(argv: list[str] | None = None) -> int:
    tune_allocator()  # before torch allocates anything: see cifar100.runtime.allocator
    stopping.install()  # SIGINT and SIGTERM stop every phase within seconds
    stopping.reset()
    args = build_parser().parse_args(argv)
    args.argv = ["cifar100", *(sys.argv[1:] if argv is None else argv)]  # for run.json
    try:
        return args.func(args) or 0
    except UserError as error:
        print(f"cifar100: error: {error}", file=sys.stderr)
        return 1
    except stopping.Interrupted as stop:
        print(f"cifar100: stopped by {stop.signal_name}: {stop.detail}", file=sys.stderr)
        return stop.exit_code
    except KeyboardInterrupt:
        print("cifar100: stopped by SIGINT: nothing was saved", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
