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
from cifar100.models import input_size, model_spec
from cifar100.teachers import check_teachers
from cifar100.weights import ENV_VAR as WEIGHTS_ENV
from cifar100.weights import resolve_weights

DEFAULT_PRESET = "quick"
AUGMENT_BEYOND_FLIP = (
    "augment.translate",
    "augment.rotation",
    "augment.zoom",
    "augment.contrast",
    "augment.mixup_alpha",
    "augment.cutmix_alpha",
    "augment.mix_off_epochs",
)
STAGE2_KEYS = (
    "train.batch_size",
    "transfer.stage2_lr",
    "transfer.stage2_unfreeze",
    "transfer.stage2_warmup_epochs",
)
PRETRAINED_ONLY = ("model.width_mult", "model.weights", "model.head_hidden")
WIDTH_STAGES = {"cnn-seed": (3, 3), "cnn-fast": (1, 4)}  # how many widths each CNN takes
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


def _rules(config: Config) -> list[tuple[bool, tuple[str, ...], str]]:
    """(applies, keys, why they do nothing) for the resolved ``config``."""
    o, t, name, d = config.optim, config.transfer, config.model.name, config.distill
    rules = [
        (
            not d.teachers,
            tuple(f"distill.{f.name}" for f in dataclasses.fields(d) if f.name != "teachers"),
            "they steer knowledge distillation, and no teacher is given (--teacher RUN)",
        ),
        (
            d.mode != "cached",
            ("distill.views", "distill.view_seed"),
            f"they draw the cached views, and distill.mode is '{d.mode}'",
        ),
        (
            o.schedule != "plateau",
            ("optim.plateau_factor", "optim.plateau_patience"),
            f"they steer the plateau schedule, and optim.schedule is '{o.schedule}'",
        ),
        (
            o.schedule == "plateau",
            ("optim.warmup_epochs",),
            "the plateau schedule has no "
            "warm-up (choose optim.schedule cosine, onecycle or constant)",
        ),
        (o.schedule == "constant", ("optim.min_lr",), "a constant schedule never decays"),
        (
            config.train.refit,
            ("train.early_stopping", "data.val_fraction"),
            "a refit (train.refit) trains on every training image: no validation split",
        ),
        (
            config.augment.mixup_alpha == 0 and config.augment.cutmix_alpha == 0,
            ("augment.mix_off_epochs",),
            "it stops MixUp/CutMix, and both augment.mixup_alpha and augment.cutmix_alpha are 0",
        ),
        (
            config.train.resize_start is None,
            ("train.resize_epochs",),
            "it is how long progressive resizing lasts, and train.resize_start is off",
        ),
        (
            config.train.resize_epochs == 0,
            ("train.resize_start",),
            "progressive resizing lasts train.resize_epochs epochs, and that is 0",
        ),
        (
            config.train.ema_decay is None,
            ("train.ema_warmup",),
            "it warms up the weight average, and train.ema_decay is off",
        ),
        (
            o.optimizer != "sgd",
            ("optim.momentum", "optim.nesterov"),
            f"they apply to sgd, and optim.optimizer is '{o.optimizer}'",
        ),
    ]
    if not model_spec(name).pretrained:
        transfer_keys = tuple(f"transfer.{f.name}" for f in dataclasses.fields(t))
        return rules + [
            (
                True,
                transfer_keys + PRETRAINED_ONLY,
                f"they apply to pretrained models, and {name} is trained from scratch",
            )
        ]
    stage1_only = t.stage2_epochs == 0
    return rules + [
        (
            True,
            ("train.epochs",),
            "a transfer model trains in stages: set "
            "transfer.stage1_epochs / transfer.stage2_epochs, or --epochs for every stage",
        ),
        (True, ("optim.lr",), "each stage has its own: transfer.stage1_lr, transfer.stage2_lr"),
        (
            True,
            ("optim.warmup_epochs",),
            "stage 1 has no warm-up; stage 2's is transfer.stage2_warmup_epochs",
        ),
        (
            config.train.ema_decay is not None,
            ("train.ema_decay", "train.ema_warmup"),
            "the transfer stages keep no moving average of the weights",
        ),
        (True, ("model.widths",), f"{name}'s widths follow model.width_mult"),
        (
            True,
            ("train.resize_start", "train.resize_epochs"),
            "progressive resizing is for models trained from scratch",
        ),
        (
            stage1_only,
            STAGE2_KEYS,
            "they apply to stage 2, which is off "
            "(transfer.stage2_epochs=0; stage 1's batch is transfer.stage1_batch_size)",
        ),
        (
            stage1_only and t.cache_features,
            AUGMENT_BEYOND_FLIP,
            "stage 1 trains on cached "
            "features, where only augment.flip applies (they apply in stage 2, or with "
            "transfer.cache_features=false)",
        ),
    ]


def check_settings(config: Config, explicit: set[str]) -> None:
    """Reject the explicitly set keys that would do nothing for ``config``; check sizes."""
    ignored = [
        f"{', '.join(hit)} ({why})"
        for applies, keys, why in _rules(config)
        if applies
        for hit in [[k for k in keys if k in explicit]]
        if hit
    ]
    if ignored:
        raise ConfigError(
            f"settings that would do nothing for {config.model.name}: " + "; ".join(ignored)
        )
    _check_widths(config)
    _check_subset(config)
    _check_refit(config)
    _check_distill(config)
    _check_resize(config)


def _check_resize(config: Config) -> None:
    train = config.train
    if train.resize_start is None or model_spec(config.model.name).pretrained:
        return
    full = input_size(config.model)
    if train.resize_start >= full:
        raise ConfigError(
            f"train.resize_start={train.resize_start} px is not smaller than "
            f"{config.model.name}'s input size ({full} px): nothing would be shrunk"
        )
    if train.resize_epochs >= train.epochs:
        raise ConfigError(
            f"train.resize_epochs={train.resize_epochs}: the run would end before its images "
            f"reach full size (train.epochs={train.epochs}); the last epochs must train at "
            f"{full} px, the size it is evaluated at"
        )


def _check_distill(config: Config) -> None:
    name = config.model.name
    if config.distill.teachers and model_spec(name).pretrained:
        raise ConfigError(
            f"distill.teachers: distillation trains a model from scratch, and {name} "
            "trains in transfer stages (choose a student such as cnn-fast)"
        )


def _check_refit(config: Config) -> None:
    if config.train.refit and config.optim.schedule == "plateau":
        raise ConfigError(
            "train.refit: the plateau schedule steps on the validation loss, and a refit "
            "has no validation split; choose optim.schedule cosine, onecycle or constant"
        )


def _check_widths(config: Config) -> None:
    widths, name = config.model.widths, config.model.name
    if widths is None or model_spec(name).pretrained:
        return
    if name not in WIDTH_STAGES:
        raise ConfigError(f"model.widths does nothing for {name}")
    low, high = WIDTH_STAGES[name]
    if not low <= len(widths) <= high:
        count = str(low) if low == high else f"{low} to {high}"
        raise ConfigError(
            f"model.widths: {name} takes {count} widths (one per stage), got {len(widths)}"
        )


def _check_subset(config: Config) -> None:
    subset = config.data.train_subset
    if subset is None:
        return
    if model_spec(config.model.name).pretrained:
        batches = {"transfer.stage1_batch_size": config.transfer.stage1_batch_size}
        if config.transfer.stage2_epochs > 0:
            batches["train.batch_size"] = config.train.batch_size
    else:
        batches = {"train.batch_size": config.train.batch_size}
    for key, size in batches.items():
        if subset < size:
            raise ConfigError(
                f"data.train_subset={subset} images are fewer than one batch "
                f"({key}={size}): raise --train-subset or lower {key}"
            )


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
