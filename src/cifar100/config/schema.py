"""Frozen dataclasses: the single source of truth for a run's settings.

Defaults live here; YAML files (``--config``, named presets) and ``key=value`` overrides
only change them. The resolved config is written into every run directory, so a run can
be reproduced from its folder alone.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cifar100.config import limits
from cifar100.errors import UserError

PRESETS_DIR = Path(__file__).parent / "presets"


class ConfigError(UserError, ValueError):
    """A config file or override that does not fit the schema."""


@dataclass(frozen=True)
class DataConfig:
    data_dir: str | None = None  # folder holding cifar-100-python/; None: env, cache, download
    val_fraction: float = 0.2
    train_subset: int | None = None  # class-balanced subset of the train split, for smoke runs
    standardize: bool = True  # subtract/divide by the model's channel mean/std
    # Fixes which images validate (and the train subset), apart from train.seed: two seeds
    # of one recipe are then compared on the same validation images.
    split_seed: int = 0


@dataclass(frozen=True)
class AugmentConfig:
    flip: bool = True
    translate: int = 4  # max shift in pixels (reflect-padded random crop)
    rotation: float = 0.0  # max degrees, either way
    zoom: float = 0.0  # max relative zoom in/out (0.1 = +-10%)
    contrast: float = 0.0  # max relative contrast change
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    # MixUp/CutMix stop for the last N epochs (timm's --mixup-off-epoch), so training ends
    # on whole images, as evaluation shows them.
    mix_off_epochs: int = 0


@dataclass(frozen=True)
class ModelConfig:
    name: str = "cnn-fast"
    widths: tuple[int, ...] | None = None  # per-stage channels; None: the model's default
    dropout: float | None = None
    width_mult: float = 1.0  # MobileNetV2 width multiplier (ImageNet weights: 1.0 only)
    image_size: int | None = None  # input size the model sees; None: the model's default
    weights: str | None = None  # pretrained weights file; None: env variable, cache, download
    head_hidden: int | None = None  # transfer head: None = dropout + linear; N = small MLP


@dataclass(frozen=True)
class OptimConfig:
    optimizer: str = "adam"  # adam | adamw | sgd | muon
    lr: float = 1e-3  # under muon: the SGD part's (BatchNorm, biases, classifier head)
    # muon only (cifar100.training.optim.MuonSgd): the convolution filters' lr, a share of
    # their norm moved per step, and their Nesterov momentum (airbench's 0.24 and 0.6)
    muon_lr: float = 0.24
    muon_momentum: float = 0.6
    weight_decay: float = 0.0
    momentum: float = 0.9
    nesterov: bool = True
    schedule: str = "plateau"  # plateau | cosine | onecycle | constant
    warmup_epochs: float = 0.0
    plateau_factor: float = 0.5
    plateau_patience: int = 3
    min_lr: float = 1e-6
    label_smoothing: float = 0.0
    grad_clip: float | None = None


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 30
    batch_size: int = 128
    eval_batch_size: int = 500
    early_stopping: int | None = 10  # epochs without val improvement; None: off
    seed: int = 0  # initialisation, shuffling, augmentation (the split has data.split_seed)
    device: str = "auto"  # auto | cpu | cuda | mps
    ema_decay: float | None = None  # exponential moving average of weights
    ema_warmup: str | None = None  # tf | timm | mean: the decay rises from ~0 (training.ema)
    # A weight average sized to the run: it spans this share of the run's steps (decay
    # 1 - 1 / (share x steps), after a plain-mean warm-up). Instead of train.ema_decay.
    ema_span: float | None = None
    tta_flip: bool = False  # average logits with the mirrored image at evaluation
    # Also average over the image moved N pixels up-left and down-right (reflected border)
    # at test time: 0 off. On validation, for cnn-fast, 1 added 1.4 points (docs/tta.md).
    tta_translate: int = 0
    # last.pt at most this often (at the next epoch end or sync step), and always at each
    # stage's end and on a stop: a kill -9 loses at most this much training. 0: every epoch
    # and sync step. On a fast device an epoch is a second; a write per epoch would cost more.
    checkpoint_minutes: float = 2.0
    threads: int | None = None  # CPU threads; None: all cores
    sync_bn: bool = False  # under torchrun on CUDA: BatchNorm statistics over the global batch
    sync_every: int | None = None  # steps between host read-backs / rank votes; None: 1 on
    # CPU, 20 on a GPU (reading a GPU value makes the host wait for the device)
    compile: bool = False  # torch.compile the training forward/backward (falls back to eager)
    # torch.compile's mode when train.compile is on: default, reduce-overhead (CUDA graphs),
    # max-autotune, max-autotune-no-cudagraphs. benchmarks/gpu_throughput.py measures each.
    compile_mode: str = "default"
    # auto: bf16 autocast on CUDA, fp32 elsewhere. bf16: autocast on any device; on a CPU it
    # pays only with native bf16 (AMX, AVX512-BF16), elsewhere it is emulated and slower.
    precision: str = "auto"
    # Train on all 50,000 training images, for a recipe already validated: no validation
    # split exists, so nothing selects an epoch (the best checkpoint is the last one).
    refit: bool = False
    # Progressive resizing (cifar100.data.augment.ResizeSchedule): the first resize_epochs epochs
    # see the images shrunk, from resize_start px up to the model's size. Models trained
    # from scratch only; None: off.
    resize_start: int | None = None
    resize_epochs: int = 0


@dataclass(frozen=True)
class TransferConfig:
    """A pretrained model's two stages: a frozen backbone with a new head, then fine-tuning."""

    stage1_epochs: int = 30
    stage1_lr: float = 1e-3
    stage1_batch_size: int = 256
    cache_features: bool = True  # stage 1 trains the head on stored backbone features
    # Top N feature blocks that stage 1 trains too, on the cached output maps of the blocks
    # below them (with cache_features): more than a head, still no pass over the whole net.
    stage1_unfreeze: int = 0
    compile: bool = True  # torch.compile the backbone for feature extraction (CPU: ~1.6x)
    stage2_epochs: int = 0  # 0: stop after stage 1
    stage2_lr: float = 1e-4
    stage2_unfreeze: int | None = None  # top N feature blocks; None: all
    stage2_warmup_epochs: float = 0.5


@dataclass(frozen=True)
class DistillConfig:
    """Knowledge distillation (``cifar100.training.distill``): the student also learns the softened
    probabilities of trained runs, the teachers."""

    teachers: tuple[str, ...] = ()  # run folders or .pt files; several: an ensemble; (): off
    temperature: float = 4.0  # softens teacher and student alike (Hinton et al., 2015)
    weight: float = 0.9  # of the distillation term; the labels' term gets 1 - weight
    # online: the teachers run on every (augmented, mixed) batch; cached: their logits for
    # ``views`` augmented views of each image are computed once and reused by every run.
    mode: str = "online"
    views: int = 8  # cached: views per training image (drawn from the augment settings)
    view_seed: int = 0  # cached: draws the views (part of the cache's key)
    # Standardise each row of logits (teacher's and student's) before the temperature
    # (logit standardisation, Sun et al., CVPR 2024): matches their shapes, not their scales.
    standardize: bool = False
    compile: bool = True  # torch.compile a teacher on CPU that will see 20,000+ images


@dataclass(frozen=True)
class TrackConfig:
    """Where else a run is recorded, besides its folder (``cifar100.runs.tracking``)."""

    # An MLflow tracking URI (file:./mlruns, sqlite:///mlflow.db, http://host:5000): the
    # finished run is logged there (params, curves, final figures, its record); None: off.
    mlflow: str | None = None


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    track: TrackConfig = field(default_factory=TrackConfig)


def to_dict(config: Config) -> dict[str, Any]:
    """Plain nested dict (tuples as lists), ready for YAML or JSON."""
    return _plain(dataclasses.asdict(config))


def flat_settings(config: Config) -> dict[str, Any]:
    """Every setting by its ``--set`` name: ``{"optim.lr": 0.1, ...}`` (lists stay lists)."""
    return {
        f"{section}.{key}": value
        for section, values in to_dict(config).items()
        for key, value in values.items()
    }


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def from_dict(values: dict[str, Any], base: Config | None = None) -> Config:
    """Apply a nested dict of settings on top of ``base`` (defaults when None)."""
    config = base or Config()
    if not isinstance(values, dict):
        raise ConfigError(f"expected a mapping of sections, got {type(values).__name__}")
    sections = {}
    names = [f.name for f in dataclasses.fields(Config)]
    for name, section_values in values.items():
        if name not in names:
            raise ConfigError(f"unknown config section '{name}' (choose from {', '.join(names)})")
        if section_values is not None and not isinstance(section_values, dict):
            raise ConfigError(
                f"section '{name}' must be a mapping of settings, got {section_values!r}"
            )
        section = getattr(config, name)
        sections[name] = _replace_checked(section, section_values or {}, prefix=name)
    return dataclasses.replace(config, **sections)


def _replace_checked(section: Any, values: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(type(section))
    changes = {}
    for key, raw in values.items():
        if key not in hints:
            raise ConfigError(
                f"unknown setting '{prefix}.{key}' (settings of '{prefix}': {', '.join(hints)})"
            )
        value = _coerce(raw, hints[key], f"{prefix}.{key}")
        problem = limits.problem(f"{prefix}.{key}", value)
        if problem:
            raise ConfigError(problem)
        changes[key] = value
    return dataclasses.replace(section, **changes)


def _coerce(raw: Any, hint: Any, name: str) -> Any:
    """Turn YAML/CLI values into the annotated type, or fail with the setting's name."""
    options = typing.get_args(hint) if _is_union(hint) else (hint,)
    if raw is None or (isinstance(raw, str) and raw.lower() in {"none", "null"}):
        if type(None) in options:
            return None
        raise ConfigError(f"{name} may not be empty")
    for option in (o for o in options if o is not type(None)):
        try:
            return _coerce_one(raw, option)
        except (TypeError, ValueError):
            continue
    raise ConfigError(f"{name}: cannot use {raw!r} as {hint}")


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def _coerce_one(raw: Any, kind: Any) -> Any:
    if typing.get_origin(kind) is tuple:  # tuple[int, ...] or tuple[str, ...]
        item = typing.get_args(kind)[0]
        items = [i for i in raw.split(",") if i] if isinstance(raw, str) else list(raw)
        if item is str and not all(isinstance(i, str) for i in items):
            raise ValueError(raw)
        return tuple(item(i) for i in items)
    if kind is bool:
        if isinstance(raw, bool):
            return raw
        if str(raw).lower() in {"true", "1", "yes", "on"}:
            return True
        if str(raw).lower() in {"false", "0", "no", "off"}:
            return False
        raise ValueError(raw)
    if kind is int and isinstance(raw, float) and not raw.is_integer():
        raise ValueError(raw)
    if kind in (int, float) and isinstance(raw, bool):
        raise ValueError(raw)
    return kind(raw)


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["optim.lr=0.01", "train.epochs=5"]`` -> nested dict (values parsed as YAML)."""
    nested: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or "." not in key:
            raise ConfigError(f"override '{pair}' must look like section.key=value")
        section, _, name = key.partition(".")
        try:
            nested.setdefault(section, {})[name] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ConfigError(f"override '{pair}': the value is not valid YAML") from None
    return nested


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        values = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(
            f"{path}: cannot read the config file "
            f"({getattr(error, 'strerror', None) or type(error).__name__})"
        ) from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({error.__class__.__name__})") from None
    return values or {}


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def layered_config(
    preset: str | None = None,
    files: list[str | Path] = (),
    overrides: dict[str, Any] | None = None,
) -> Config:
    """Defaults <- named preset <- YAML files in order <- overrides (last wins)."""
    config = Config()
    if preset:
        if preset not in preset_names():
            names = ", ".join(preset_names())
            raise ConfigError(f"unknown preset '{preset}' (choose from {names})")
        config = from_dict(read_yaml(PRESETS_DIR / f"{preset}.yaml"), config)
    for file in files:
        values = read_yaml(file)  # its errors name the file already
        try:
            config = from_dict(values, config)
        except ConfigError as error:
            raise ConfigError(f"{file}: {error}") from None
    if overrides:
        config = from_dict(overrides, config)
    return config


def from_saved(values: dict[str, Any]) -> Config:
    """A run's saved config (config.yaml, a checkpoint), older versions' included.

    Runs made before ``data.split_seed`` existed drew their split with ``train.seed``:
    they keep it, so they are still evaluated on the same validation images.
    """
    if not isinstance(values, dict):
        raise ConfigError(f"expected a mapping of sections, got {type(values).__name__}")
    data = dict(values.get("data") or {})
    if "split_seed" not in data:
        data["split_seed"] = (values.get("train") or {}).get("seed", 0)
    return from_dict({**values, "data": data})


def save_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
