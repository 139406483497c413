"""The valid choices and ranges of the settings in ``cifar100.config.schema``.

Checked whenever a value is set (preset, config file, ``--set``, flag), so a bad value
fails at once with its name and the allowed range, never mid-run with a traceback.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

OPTIMIZERS = ("adam", "adamw", "sgd", "muon")
SCHEDULES = ("plateau", "cosine", "onecycle", "constant")
DISTILL_MODES = ("online", "cached")
EMA_WARMUPS = ("tf", "timm", "mean")  # see cifar100.training.ema; None: a fixed decay
PRECISIONS = ("auto", "fp32", "bf16")  # see cifar100.runtime.speed.autocast_dtype
# torch.compile's modes (cifar100.runtime.speed.compile_model); reduce-overhead: CUDA graphs
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CHOICES = {
    "optim.optimizer": OPTIMIZERS,
    "optim.schedule": SCHEDULES,
    "train.ema_warmup": EMA_WARMUPS,
    "train.precision": PRECISIONS,
    "train.compile_mode": COMPILE_MODES,
    "distill.mode": DISTILL_MODES,
}
# The stores an MLflow tracking URI may name: local files, a database, a tracking server.
MLFLOW_SCHEMES = ("file", "sqlite", "postgresql", "mysql", "http", "https", "databricks")
SEED_MAX = 2**32 - 1
MOBILENETV2_BLOCKS = 19  # feature blocks that transfer.stage*_unfreeze count (the fewest)


class Range(NamedTuple):
    low: float | None = None  # None: unbounded
    high: float | None = None
    low_open: bool = False  # True: the bound itself is excluded
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        above = self.low is None or value > self.low or (value == self.low and not self.low_open)
        below = (
            self.high is None or value < self.high or (value == self.high and not self.high_open)
        )
        return above and below

    def __str__(self) -> str:
        if self.high is None:
            return f"above {self.low}" if self.low_open else f"at least {self.low}"
        left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
        return f"in {left}{self.low}, {self.high}{right}"


POSITIVE_INT = Range(1)
NON_NEGATIVE = Range(0)
ABOVE_ZERO = Range(0, low_open=True)
FRACTION = Range(0, 1, high_open=True)  # [0, 1)
SEED = Range(0, SEED_MAX)

RANGES = {
    "data.val_fraction": Range(0, 1, True, True),
    "data.train_subset": POSITIVE_INT,
    "data.split_seed": SEED,
    "augment.translate": Range(0, 16),
    "augment.rotation": Range(0, 180),
    "augment.zoom": FRACTION,
    "augment.contrast": Range(0, 1),
    "augment.mixup_alpha": NON_NEGATIVE,
    "augment.cutmix_alpha": NON_NEGATIVE,
    "augment.mix_off_epochs": NON_NEGATIVE,
    "model.dropout": FRACTION,
    "model.width_mult": ABOVE_ZERO,
    "model.image_size": Range(32, 1024),
    "model.head_hidden": POSITIVE_INT,
    "optim.lr": ABOVE_ZERO,
    "optim.weight_decay": NON_NEGATIVE,
    "optim.momentum": FRACTION,
    "optim.muon_lr": Range(0, 1, low_open=True),
    "optim.muon_momentum": FRACTION,
    "optim.warmup_epochs": NON_NEGATIVE,
    "optim.plateau_factor": Range(0, 1, True, True),
    "optim.plateau_patience": NON_NEGATIVE,
    "optim.min_lr": NON_NEGATIVE,
    "optim.label_smoothing": FRACTION,
    "optim.grad_clip": ABOVE_ZERO,
    "train.epochs": POSITIVE_INT,
    "train.batch_size": POSITIVE_INT,
    "train.eval_batch_size": POSITIVE_INT,
    "train.early_stopping": POSITIVE_INT,
    "train.seed": SEED,
    "train.ema_decay": Range(0, 1, True, True),
    "train.ema_span": Range(0, 1, True, False),
    "train.checkpoint_minutes": NON_NEGATIVE,
    "train.threads": POSITIVE_INT,
    "train.tta_translate": Range(0, 8),
    "train.resize_start": Range(8, 1024),  # the smallest a 3-pooling CNN still sees as an image
    "train.resize_epochs": NON_NEGATIVE,
    "transfer.stage1_epochs": POSITIVE_INT,
    "transfer.stage1_lr": ABOVE_ZERO,
    "transfer.stage1_batch_size": POSITIVE_INT,
    "transfer.stage1_unfreeze": Range(0, MOBILENETV2_BLOCKS - 1),
    "transfer.stage2_epochs": NON_NEGATIVE,
    "transfer.stage2_lr": ABOVE_ZERO,
    "transfer.stage2_unfreeze": Range(0, MOBILENETV2_BLOCKS),
    "transfer.stage2_warmup_epochs": NON_NEGATIVE,
    "distill.temperature": Range(0, 100, low_open=True),
    "distill.weight": Range(0, 1),
    "distill.views": Range(1, 64),
    "distill.view_seed": SEED,
}


def problem(name: str, value: Any) -> str | None:
    """Why ``value`` does not fit setting ``name`` (one line), or None when it does."""
    if value is None:
        return None
    if name in CHOICES and value not in CHOICES[name]:
        return f"unknown {name} '{value}' (choose from {', '.join(CHOICES[name])})"
    if name == "model.widths" and (not value or min(value) < 1):
        return f"model.widths must list positive channel counts, got {list(value)}"
    if name == "track.mlflow" and value.partition(":")[0] not in MLFLOW_SCHEMES:
        return (
            f"track.mlflow must be a tracking URI starting with one of "
            f"{', '.join(s + ':' for s in MLFLOW_SCHEMES)}, got '{value}' "
            "(e.g. file:./mlruns)"
        )
    if isinstance(value, float) and not math.isfinite(value):
        return f"{name} must be a finite number, got {value}"
    if name in RANGES and value not in RANGES[name]:
        return f"{name} must be {RANGES[name]}, got {value}"
    return None
