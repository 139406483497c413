"""The flags several commands take, each declared once: its argparse options, and in each
command that takes it, its help there (what ``--json`` prints, which ``--out`` it writes)
and any option that differs there.

A command adds them by name, where they belong in its ``--help``:
``add_shared(parser, "export", "calibrated", "json")``. The flags of ``train`` and ``tune``
that fill settings are in ``recipes.flags``.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cifar100.recipes.argtypes import seed
from cifar100.recipes.flags import DATA_DIR_HELP

MODEL_FILES = "RUN_DIR|FILE|FOLDER"


@dataclass(frozen=True)
class SharedFlag:
    flag: str  # "--json"
    helps: dict[str, str]  # command -> its help there; the commands that take the flag
    options: dict[str, Any] = field(default_factory=dict)  # argparse's, in every command
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)  # command -> its own

    def add_to(self, parser: argparse.ArgumentParser, command: str) -> None:
        options = {**self.options, **self.variants.get(command, {})}
        parser.add_argument(self.flag, help=self.helps[command], **options)


SHARED_FLAGS = {
    "data_dir": SharedFlag(
        "--data-dir",
        {
            "data": DATA_DIR_HELP,
            "evaluate": DATA_DIR_HELP,
            "export": "folder holding cifar-100-python/ for the check "
            "(default: the run's, else $CIFAR100_DATA, the cache or a download)",
        },
    ),
    "seed": SharedFlag(
        "--seed",
        {
            "data": "seed of the train/validation split, as data.split_seed in a run (default 0)",
            "tune": "seed of the sampler (default 0)",
        },
        {"type": seed, "default": 0},
    ),
    "out": SharedFlag(
        "--out",
        {
            "compare": "also write the table to FILE",
            "evaluate": "report folder (default: RUN_DIR/report, or "
            "FIRST_RUN_DIR/report-ensemble for several runs)",
            "export": "output file (with --format all, its suffix is replaced per format), or "
            "folder for --format hub; default: RUN_DIR/model.onnx, RUN_DIR/model.safetensors, "
            "RUN_DIR/hub",
        },
        {"type": Path},
        {"compare": {"metavar": "FILE"}, "export": {"metavar": "PATH"}},
    ),
    "model": SharedFlag(
        "--model",
        {
            "predict": "run directory (or .pt checkpoint), or what 'cifar100 export' wrote "
            "(.onnx, .safetensors, or the --format hub folder)",
            "serve": "run directory or .pt checkpoint, or what 'cifar100 export' wrote (.onnx, "
            ".safetensors, the --format hub folder); default: the best run under --runs-dir",
        },
        {"type": Path, "metavar": MODEL_FILES},
        {"predict": {"required": True}},
    ),
    "calibrated": SharedFlag(
        "--calibrated",
        {
            "export": "divide the logits by the temperature 'cifar100 evaluate' fitted on "
            "the validation split (RUN/calibration.json)",
            "predict": "temperature-scaled probabilities (the temperature 'cifar100 evaluate' "
            "fitted on the validation split; run directories and checkpoints only: an "
            "exported file carries its own)",
        },
        {"action": "store_true"},
    ),
    "json": SharedFlag(
        "--json",
        {
            "data": "print the summary as JSON",
            "models": "print the table as JSON",
            "evaluate": "print the headline metrics as JSON",
            "export": "print the files and checks as JSON",
            "predict": "print a JSON list of {image, top: [{class, probability}], error?}",
        },
        {"action": "store_true"},
    ),
}


def add_shared(parser: argparse.ArgumentParser, command: str, *names: str) -> None:
    """Add the shared flags ``names`` (their ``dest``: "data_dir") to ``command``'s parser,
    in this order."""
    for name in names:
        SHARED_FLAGS[name].add_to(parser, command)
