"""Optimizers and learning-rate schedules, chosen by name from ``OptimConfig``.

``muon`` is airbench's split (Keller Jordan's CIFAR-10 speed runs, and the CIFAR-100
speedrun after them): the convolution filters take Muon steps, their momentum
orthogonalised by a Newton-Schulz iteration; BatchNorm, biases and the classifier head
take SGD with Nesterov momentum. Both live in one ``torch.optim.Optimizer`` so the lr
schedule scales both, and one ``state_dict`` saves and resumes both exactly.
"""

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
    if config.optimizer == "muon":
        return MuonSgd(params, config, lr)
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            groups,
            lr=lr,
            momentum=config.momentum,
            nesterov=config.nesterov,
            **_kernels(torch.optim.SGD, params),
        )
    raise ConfigError(f"unknown optim.optimizer '{config.optimizer}' (adam, adamw, sgd or muon)")


def _kernels(optimizer: type, params: list[torch.Tensor]) -> dict[str, Any]:
    """``fused=True`` when every parameter is on CUDA and this torch has the fused kernel.

    One kernel updates all parameters instead of a few per tensor. CPU keeps torch's
    default implementation, so CPU results are what they were.
    """
    on_cuda = bool(params) and all(p.is_cuda for p in params)
    if on_cuda and "fused" in inspect.signature(optimizer).parameters:
        return {"fused": True}
    return {}


# Newton-Schulz quintic coefficients (Keller Jordan's): five steps push every singular value
# not far below the largest into about [0.7, 1.2], which is all Muon needs.
NEWTON_SCHULZ = (3.4445, -4.7750, 2.0315)


def orthogonalise(matrix: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """``matrix`` with its singular values pushed towards 1 (about U V^T of its SVD)."""
    a, b, c = NEWTON_SCHULZ
    x = matrix / (matrix.norm() + 1e-7)  # singular values <= 1, where the iteration converges
    wide = x.size(0) <= x.size(1)
    x = x if wide else x.T  # the Gram matrix of the short side is the cheap one
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x if wide else x.T


def muon_params(params: Iterable[torch.Tensor]) -> tuple[list, list]:
    """(convolution filters, everything else): the parameters Muon steps and those SGD does."""
    params = list(params)
    return [p for p in params if p.ndim == 4], [p for p in params if p.ndim != 4]


class MuonSgd(torch.optim.Optimizer):
    """Muon for the convolution filters, SGD with Nesterov momentum for the other parameters.

    A Muon step keeps each filter bank at norm sqrt(out channels) (a convolution followed
    by BatchNorm computes the same whatever its scale, so only its direction learns, and
    weight decay has nothing to do there), then moves it by ``lr`` times its orthogonalised
    Nesterov momentum, the filters flattened to (out, in x kh x kw). Groups with
    ``muon=False`` are plain ``torch.optim.SGD`` steps (weight decay on the head's weights).
    """

    def __init__(self, params: Iterable[torch.Tensor], config: OptimConfig, lr: float | None):
        scale = 1.0 if lr is None else lr / config.lr  # a stage's own lr scales both alike
        filters, others = muon_params(params)
        decay = [p for p in others if p.ndim > 1]
        no_decay = [p for p in others if p.ndim <= 1]
        muon = {"muon": True, "lr": config.muon_lr * scale, "momentum": config.muon_momentum}
        sgd = {"muon": False, "lr": config.lr * scale, "momentum": config.momentum}
        groups = [
            {**muon, "params": filters, "weight_decay": 0.0},
            {**sgd, "params": decay, "weight_decay": config.weight_decay},
            {**sgd, "params": no_decay, "weight_decay": 0.0},
        ]
        super().__init__([g for g in groups if g["params"]], {"nesterov": config.nesterov})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._step_one(p, group)
        return loss

    def _step_one(self, p: torch.Tensor, group: dict) -> None:
        grad = p.grad
        if not group["muon"] and group["weight_decay"]:
            grad = grad.add(p, alpha=group["weight_decay"])
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p)
        buf = state["momentum_buffer"]
        buf.mul_(group["momentum"]).add_(grad)
        update = grad.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf
        if group["muon"]:
            p.mul_(len(p) ** 0.5 / (p.norm() + 1e-12))
            update = orthogonalise(update.reshape(len(p), -1).float()).view_as(p).to(p.dtype)
        p.add_(update, alpha=-group["lr"])


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
