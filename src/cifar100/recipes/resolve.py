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
from typing import Any

from cifar100.config.schema import (
    Config,
    layered_config,
    parse_overrides,
    preset_names,
    read_yaml,
    to_dict,
)
from cifar100.models import model_spec
from cifar100.models.weights import ENV_VAR as WEIGHTS_ENV
from cifar100.models.weights import resolve_weights
from cifar100.recipes.relevance import check_settings
from cifar100.runtime.device import check_device
from cifar100.training.distill.teachers import check_teachers

DEFAULT_PRESET = "quick"


def choose_preset(preset: str | None, model: str | None) -> str | None:
    """The preset named, else the one named like ``--model``, else 'quick' (no --model)."""
    if preset:
        return preset
    if model:
        return model if model in preset_names() else None
    return DEFAULT_PRESET


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
    config = layered_config(preset, files, overrides)
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
