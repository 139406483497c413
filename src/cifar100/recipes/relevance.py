"""Which settings apply to which recipe: an explicitly set key that would do nothing for
the resolved ``Config`` is rejected with the reason, and sizes that cannot work (widths,
a subset smaller than a batch, progressive resizing that never reaches full size) are
refused before a run starts. ``recipes.resolve`` calls ``check_settings``; the tests hold
every preset to the same rule.
"""

from __future__ import annotations

import dataclasses

from cifar100.config.schema import Config, ConfigError
from cifar100.models import input_size, model_spec

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


Rule = tuple[bool, tuple[str, ...], str]  # (applies, keys, why they would do nothing)


def _rules(config: Config) -> list[Rule]:
    """Every rule for the resolved ``config``: the common ones, then its kind of model's."""
    if model_spec(config.model.name).pretrained:
        return _common_rules(config) + _transfer_rules(config)
    return _common_rules(config) + _scratch_rules(config)


def _common_rules(config: Config) -> list[Rule]:
    o, d = config.optim, config.distill
    return [
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
            "it warms up the weight average, and train.ema_decay is off (train.ema_span "
            "brings its own warm-up)",
        ),
        (
            o.optimizer not in ("sgd", "muon"),
            ("optim.momentum", "optim.nesterov"),
            f"they apply to sgd and muon, and optim.optimizer is '{o.optimizer}'",
        ),
        (
            o.optimizer != "muon",
            ("optim.muon_lr", "optim.muon_momentum"),
            f"they apply to muon, and optim.optimizer is '{o.optimizer}'",
        ),
    ]


def _scratch_rules(config: Config) -> list[Rule]:
    transfer_keys = tuple(f"transfer.{f.name}" for f in dataclasses.fields(config.transfer))
    return [
        (
            True,
            transfer_keys + PRETRAINED_ONLY,
            f"they apply to pretrained models, and {config.model.name} is trained from scratch",
        )
    ]


def _transfer_rules(config: Config) -> list[Rule]:
    t, name = config.transfer, config.model.name
    stage1_only = t.stage2_epochs == 0
    return [
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
            config.train.ema_decay is not None or config.train.ema_span is not None,
            ("train.ema_decay", "train.ema_warmup", "train.ema_span"),
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
    _check_ema(config)
    _check_muon(config)


def _check_muon(config: Config) -> None:
    if config.optim.optimizer == "muon" and model_spec(config.model.name).pretrained:
        raise ConfigError(
            f"optim.optimizer=muon trains from scratch: it resets each filter bank's norm, "
            f"which would rescale {config.model.name}'s pretrained filters (use sgd or adamw)"
        )


def _check_ema(config: Config) -> None:
    train = config.train
    if train.ema_span is not None and train.ema_decay is not None:
        raise ConfigError(
            f"train.ema_span={train.ema_span} and train.ema_decay={train.ema_decay}: choose "
            "one (the span sizes the decay to the run; ema_decay fixes it)"
        )


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
