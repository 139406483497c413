"""Optimizers and learning-rate schedules, chosen by name from ``OptimConfig``."""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable
from typing import Any

import torch

from cifar100.config.schema import ConfigError, OptimConfig


def make_optimizer(params: Iterable, config: OptimConfig, lr: float | None = None):
    lr = config.lr if lr is None else lr
    # Decay only weights of convs/linears: decaying BN scales and biases hurts short runs.
    params = list(params)
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if config.optimizer == "adam":
        return torch.optim.Adam(groups, lr=lr, **_kernels(torch.optim.Adam, params))
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr, **_kernels(torch.optim.AdamW, params))
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            groups,
            lr=lr,
            momentum=config.momentum,
            nesterov=config.nesterov,
            **_kernels(torch.optim.SGD, params),
        )
    raise ConfigError(f"unknown optim.optimizer '{config.optimizer}' (adam, adamw or sgd)")


def _kernels(optimizer: type, params: list[torch.Tensor]) -> dict[str, Any]:
    """``fused=True`` when every parameter is on CUDA and this torch has the fused kernel.

    One kernel updates all parameters instead of a few per tensor. CPU keeps torch's
    default implementation, so CPU results are what they were.
    """
    on_cuda = bool(params) and all(p.is_cuda for p in params)
    if on_cuda and "fused" in inspect.signature(optimizer).parameters:
        return {"fused": True}
    return {}


KERNEL_FLAGS = ("fused", "foreach", "capturable")  # how to step, not what to step with


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """``optimizer.load_state_dict(state)``, keeping this optimizer's choice of kernels.

    ``load_state_dict`` takes every group setting from the file, the kernel flags too: a
    checkpoint saved by a fused CUDA optimizer would ask a CPU resume for fused kernels,
    and a CPU checkpoint would switch a GPU resume's fused kernels off. The flags also
    decide where the ``step`` counters go (the device for fused, the host otherwise).
    """
    mine = [{k: g[k] for k in KERNEL_FLAGS if k in g} for g in optimizer.param_groups]
    groups = [
        {**{k: v for k, v in saved.items() if k not in KERNEL_FLAGS}, **flags}
        for saved, flags in zip(state["param_groups"], mine, strict=True)
    ]
    optimizer.load_state_dict({**state, "param_groups": groups})


class StepSchedule:
    """Per-step multiplier of the base lr: linear warm-up, then cosine, one-cycle or flat.

    A plain callable object (not a lambda) so ``LambdaLR.state_dict`` can save it.
    """

    def __init__(self, kind: str, total_steps: int, warmup_steps: int, min_ratio: float):
        self.kind, self.total, self.warmup = kind, total_steps, warmup_steps
        self.min_ratio = min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.kind == "constant":
            return 1.0
        progress = min((step - self.warmup) / max(self.total - self.warmup, 1), 1.0)
        if self.kind == "cosine":
            return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        if self.kind == "onecycle":  # airbench-style: ramp up (warm-up), then linear to zero
            return max(1.0 - progress, self.min_ratio)
        raise ConfigError(
            f"unknown optim.schedule '{self.kind}' (plateau, cosine, onecycle or constant)"
        )


def make_scheduler(
    optimizer,
    config: OptimConfig,
    epochs: int,
    steps_per_epoch: int,
    warmup_epochs: float | None = None,
):
    """Returns (scheduler, per_step). ReduceLROnPlateau steps per epoch on validation loss."""
    if config.schedule == "plateau":
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer,
            mode="min",
            factor=config.plateau_factor,
            patience=config.plateau_patience,
            min_lr=config.min_lr,
        )
        return scheduler, False
    warmup = config.warmup_epochs if warmup_epochs is None else warmup_epochs
    if config.schedule == "onecycle" and warmup == 0:
        warmup = 0.25 * epochs
    base_lr = optimizer.param_groups[0]["lr"]
    schedule = StepSchedule(
        config.schedule,
        epochs * steps_per_epoch,
        round(warmup * steps_per_epoch),
        config.min_lr / base_lr,
    )
    schedule(0)  # fail now, not mid-run, on an unknown name
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule), True


def restore_scheduler(scheduler, saved: dict, optimizer) -> None:
    """Load the scheduler's progress; its shape (length, warm-up) follows the config.

    ``LambdaLR`` saves its schedule objects' fields too, so a resume with more epochs
    (``--resume RUN --epochs N``) would otherwise keep the old length. An unchanged
    config restores the very same values: an exact resume stays exact.
    """
    schedules = getattr(scheduler, "lr_lambdas", [])
    planned = [dict(vars(f)) for f in schedules]
    scheduler.load_state_dict(saved)
    if any(vars(f) != p for f, p in zip(schedules, planned, strict=True)):
        for f, p in zip(schedules, planned, strict=True):
            vars(f).update(p)
        for group, base, f in zip(
            optimizer.param_groups, scheduler.base_lrs, schedules, strict=True
        ):
            group["lr"] = base * f(scheduler.last_epoch)
