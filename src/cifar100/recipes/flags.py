"""The flags of ``cifar100 train`` and ``cifar100 tune`` in one table: the setting each fills,
its type and help, whether ``tune`` offers it and whether ``train --resume`` accepts it.

The parsers, the resolver (``config_from_args``, ``from_flags``) and the ``--resume`` check
all read this table, so a new flag is one row here.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cifar100.config.limits import PRECISIONS
from cifar100.config.schema import Config, preset_names
from cifar100.models import REGISTRY
from cifar100.recipes.argtypes import positive_int, probability, seed, setting
from cifar100.recipes.resolve import choose_preset, resolve


@dataclass(frozen=True, kw_only=True)
class Flag:
    flag: str  # "--train-subset"
    help: str  # in ``train``
    name: str | None = None  # its keyword in ``from_flags`` and ``args``; None: from ``flag``
    key: str | None = None  # the setting it fills ("data.train_subset"); None: none
    type: Callable[[str], Any] | None = None
    metavar: str | None = None
    choices: tuple[str, ...] | None = None
    many: bool = False  # takes one or more values
    repeat: bool = False  # may be given several times; the values collect in a list
    switch: bool = False  # takes no value
    tune: str | None = None  # its help in ``tune``; None: ``train`` only
    resumable: bool = False  # ``train --resume`` accepts it

    @property
    def dest(self) -> str:
        return self.name or self.flag.lstrip("-").replace("-", "_")

    def add_to(self, parser: argparse.ArgumentParser, command: str) -> None:
        options: dict[str, Any] = {
            "dest": self.dest,
            "help": self.tune if command == "tune" else self.help,
        }
        if self.switch:
            options.update(action="store_true", default=None)
        else:
            options.update(type=self.type, metavar=self.metavar, choices=self.choices)
        if self.many:
            options["nargs"] = "+"
        if self.repeat:
            options.update(action="append", default=[])
        parser.add_argument(self.flag, **options)


DATA_DIR_HELP = "folder holding cifar-100-python/ (or $CIFAR100_DATA)"

FLAGS = (
    Flag(
        flag="--model",
        key="model.name",
        help=f"{', '.join(sorted(REGISTRY))} (default: the preset's)",
    ),
    Flag(
        flag="--preset",
        help=f"named recipe: {', '.join(preset_names())} "
        "(default: the recipe named like --model, else 'quick')",
        tune=f"base recipe to search around: {', '.join(preset_names())} (default: quick)",
    ),
    Flag(
        flag="--config",
        metavar="FILE",
        repeat=True,
        help="YAML file(s) applied on top of the preset, in order",
    ),
    Flag(
        flag="--epochs",
        type=positive_int,
        help="number of epochs (for pretrained models: of each stage the recipe runs); "
        "with --resume: extend the run to this many",
        tune="epochs per trial (per stage for the pretrained models; default: the preset's)",
        resumable=True,
    ),
    Flag(
        flag="--seed",
        key="train.seed",
        type=seed,
        help="fixes initialisation, shuffling and augmentation (the validation split has "
        "its own data.split_seed)",
    ),
    Flag(
        flag="--train-subset",
        key="data.train_subset",
        type=positive_int,
        metavar="N",
        help="train on a class-balanced subset of N images (smoke runs)",
        tune="train each trial on a class-balanced subset of N images",
    ),
    Flag(
        flag="--device",
        key="train.device",
        help="auto, cpu, cuda, cuda:N or mps",
        resumable=True,
    ),
    Flag(
        flag="--data-dir",
        key="data.data_dir",
        help=DATA_DIR_HELP,
        tune=DATA_DIR_HELP,
        resumable=True,
    ),
    Flag(
        flag="--run-dir",
        type=Path,
        help="run folder (default: runs/MODEL-TIMESTAMP); one that holds a run is refused "
        "unless --overwrite",
    ),
    Flag(
        flag="--overwrite",
        switch=True,
        help="replace the run in --run-dir (never one another process is writing)",
    ),
    Flag(
        flag="--set",
        metavar="SECTION.KEY=VALUE",
        repeat=True,
        help="override any setting, e.g. --set optim.lr=0.01",
        tune="change the base recipe, e.g. --set train.batch_size=128",
    ),
    Flag(
        flag="--teacher",
        name="teachers",
        key="distill.teachers",
        metavar="RUN",
        many=True,
        help="knowledge distillation: learn the softened probabilities of these trained "
        "runs (or .pt checkpoints; several: an ensemble) besides the labels "
        "(distill.teachers; distill.mode online | cached: see docs/distillation.md)",
    ),
    Flag(
        flag="--kd-temperature",
        key="distill.temperature",
        type=setting("distill.temperature"),
        metavar="T",
        help="distillation temperature (distill.temperature, default 4)",
    ),
    Flag(
        flag="--kd-weight",
        key="distill.weight",
        type=probability,
        metavar="W",
        help="weight of the distillation term in [0, 1]; the labels get 1 - W "
        "(distill.weight, default 0.9)",
    ),
    Flag(
        flag="--refit",
        key="train.refit",
        switch=True,
        help="train on all 50,000 training images (a recipe already validated): no "
        "validation split, the last epoch is the best; the record says refit",
    ),
    Flag(
        flag="--precision",
        key="train.precision",
        choices=PRECISIONS,
        help="auto (default): bf16 autocast on CUDA, fp32 elsewhere; bf16 on a CPU pays "
        "only with AMX or AVX512-BF16 (train.precision)",
    ),
    Flag(flag="--json", switch=True, help="print the final metrics as JSON", resumable=True),
)
BY_DEST = {flag.dest: flag for flag in FLAGS}
RESUME_FLAGS = tuple(flag.flag for flag in FLAGS if flag.resumable)
RESUME = Flag(  # train's alone, after the table's flags: it names a run, not a setting
    flag="--resume",
    type=Path,
    metavar="RUN_DIR",
    help=f"continue a run where it stopped, with its own settings; accepts only "
    f"{', '.join(RESUME_FLAGS)}",
)


def flags_of(command: str) -> tuple[Flag, ...]:
    """The table's flags of ``command`` ("train": all of them; "tune": those it offers)."""
    return tuple(flag for flag in FLAGS if command == "train" or flag.tune is not None)


def add_flags(parser: argparse.ArgumentParser, command: str) -> None:
    for flag in flags_of(command) + ((RESUME,) if command == "train" else ()):
        flag.add_to(parser, command)


def settings_of(values: dict[str, Any]) -> dict[str, Any]:
    """'section.key' -> value of the flags among ``values`` (dest -> value) that fill one."""
    return {BY_DEST[dest].key: value for dest, value in values.items() if BY_DEST[dest].key}


def config_from_args(args: argparse.Namespace, command: str) -> Config:
    """The checked config of a new run from the parsed flags of ``command`` (see
    ``recipes.resolve``); its own flags (tune's sampler ``--seed``) are not settings."""
    given = {flag.dest: getattr(args, flag.dest) for flag in flags_of(command)}
    preset = choose_preset(given.get("preset"), given.get("model"))
    files, sets = given.get("config", []), given.get("set", [])
    return resolve(preset, files, sets, settings_of(given), given.get("epochs"))


def refused_on_resume(args: argparse.Namespace) -> dict[str, Any]:
    """flag -> value of every flag ``train --resume`` does not take (unset ones included)."""
    return {flag.flag: getattr(args, flag.dest) for flag in FLAGS if not flag.resumable}


def from_flags(
    preset: str | None = None,
    model: str | None = None,
    files: list = (),
    sets: list[str] = (),
    epochs: int | None = None,
    **flags: Any,
) -> Config:
    """The checked config of a new run from the flags of ``train`` and ``tune`` as keywords
    (``seed=1, train_subset=1000``; None: not given); the preset is
    ``choose_preset(preset, model)``."""
    unknown = sorted(name for name in flags if name not in BY_DEST or not BY_DEST[name].key)
    if unknown:
        raise TypeError(f"from_flags() got unknown flags: {', '.join(unknown)}")
    settings = settings_of({"model": model, **flags})
    return resolve(choose_preset(preset, model), files, sets, settings, epochs)
