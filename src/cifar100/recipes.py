"""From command-line flags to a checked ``Config``: the one resolver ``train`` and ``tune`` use.

Precedence, last wins: defaults < preset < ``--config`` files (in order) < ``--set`` <
flags (``--model``, ``--seed``, ...). ``--epochs N`` means the length of the run: for a
CNN ``train.epochs``, for a two-stage transfer model the length of each stage the resolved
recipe has switched on (a stage it leaves off stays off).

Settings are honest: one that would do nothing for the resolved recipe (``optim.lr`` for
MobileNetV2, whose stages have their own rates; plateau settings with a cosine schedule)
is rejected with the reason, when the user set it (``--set``, a flag, or a config file
value that differs from the default). Presets are held to the same rule by the tests.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

import torch

from cifar100.config import (
    Config,
    ConfigError,
    load_config,
    parse_overrides,
    preset_names,
    read_yaml,
    to_dict,
)
from cifar100.models import model_spec
from cifar100.settings import check_settings
from cifar100.teachers import check_teachers
from cifar100.weights import ENV_VAR as WEIGHTS_ENV
from cifar100.weights import resolve_weights

DEFAULT_PRESET = "quick"
DEVICE_PATTERN = re.compile(r"(auto|cpu|mps|cuda(:\d+)?)")


def choose_preset(preset: str | None, model: str | None) -> str | None:
    """The preset named, else the one named like ``--model``, else 'quick' (no --model)."""
    if preset:
        return preset
    if model:
        return model if model in preset_names() else None
    return DEFAULT_PRESET


def from_flags(
    preset: str | None = None,
    model: str | None = None,
    files: list = (),
    sets: list[str] = (),
    epochs: int | None = None,
    *,
    seed: int | None = None,
    train_subset: int | None = None,
    data_dir: str | None = None,
    device: str | None = None,
    refit: bool | None = None,
    teachers: list[str] | None = None,
    kd_temperature: float | None = None,
    kd_weight: float | None = None,
    precision: str | None = None,
) -> Config:
    """The checked config of a new run from the flags of ``train`` and ``tune`` (None: not
    given); the preset is ``choose_preset(preset, model)``."""
    flags = {
        "model.name": model,
        "train.seed": seed,
        "data.train_subset": train_subset,
        "data.data_dir": data_dir,
        "train.device": device,
        "train.refit": refit,
        "distill.teachers": teachers,
        "distill.temperature": kd_temperature,
        "distill.weight": kd_weight,
        "train.precision": precision,
    }
    return resolve(choose_preset(preset, model), files, sets, flags, epochs)


def resolve(
    preset: str | None,
    files: list = (),
    sets: list[str] = (),
    flags: dict[str, Any] | None = None,
    epochs: int | None = None,
) -> Config:
    """The checked config of a new run; ``flags`` maps 'section.key' to a value or None."""
    overrides = parse_overrides(list(sets))
    explicit = {f"{section}.{key}" for section, keys in overrides.items() for key in keys}
    for name, value in (flags or {}).items():
        if value is not None:
            section, key = name.split(".")
            overrides.setdefault(section, {})[key] = value
            explicit.add(name)
    config = load_config(preset, files, overrides)
    explicit |= _changed_in_files(files, config)
    if model_spec(config.model.name).pretrained and (
        config.model.weights or os.environ.get(WEIGHTS_ENV)
    ):
        resolve_weights(config.model.weights, download=False)  # a wrong path fails now
    config, stage_keys = with_epochs(config, epochs)
    check_settings(config, explicit | stage_keys)
    check_device(config.train.device)
    check_teachers(config)  # before any folder is made: a bad teacher leaves nothing
    return config


def _changed_in_files(files: list, config: Config) -> set[str]:
    """Keys the files set to something other than the default (a full dump of a config,
    e.g. a tuning study's best.yaml, restates every default: those do not count)."""
    defaults, values = to_dict(Config()), to_dict(config)
    keys = set()
    for file in files:
        for section, settings in (read_yaml(file) or {}).items():
            for key in settings or {}:
                if values[section][key] != defaults[section][key]:
                    keys.add(f"{section}.{key}")
    return keys


def with_epochs(config: Config, epochs: int | None) -> tuple[Config, set[str]]:
    """``config`` with ``--epochs`` applied, and the keys that it set."""
    if epochs is None:
        return config, set()
    if not model_spec(config.model.name).pretrained:
        return dataclasses.replace(
            config, train=dataclasses.replace(config.train, epochs=epochs)
        ), {"train.epochs"}
    stages = {"stage1_epochs": epochs}
    if config.transfer.stage2_epochs > 0:
        stages["stage2_epochs"] = epochs
    transfer = dataclasses.replace(config.transfer, **stages)
    return dataclasses.replace(config, transfer=transfer), {f"transfer.{k}" for k in stages}


def check_device(name: str) -> str:
    """``name`` if this machine has that device, else a one-line error saying why not."""
    if not DEVICE_PATTERN.fullmatch(name):
        raise ConfigError(f"unknown device '{name}' (choose from auto, cpu, cuda, cuda:N, mps)")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device '{name}': CUDA is not available on this machine "
                f"(PyTorch {torch.__version__}); use --device cpu or auto"
            )
        index = int(name.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise ConfigError(
                f"device '{name}': this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    mps = getattr(torch.backends, "mps", None)
    if name == "mps" and not (mps and mps.is_available()):
        raise ConfigError("device 'mps': Apple's Metal backend is not available here")
    return name
