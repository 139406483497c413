"""One step and one epoch: ``train_step``, ``train_one_epoch``, plain PyTorch, nothing hidden
(validation is ``cifar100.evaluation.inference.score``). The epochs of a stage, with their
checkpoints and early stopping, are ``cifar100.training.loop``; the batches come from
``cifar100.data.batches`` (or ``cifar100.training.features`` for a frozen backbone's cached
features).

On a GPU the host queues work ahead of the device unless something makes it wait: reading
a value (``.item()``, ``if tensor``, ``int(tensor)``). The loop therefore keeps its running
sums on the device and reads them back only every ``sync_every`` steps (as nanoGPT reads
its loss at ``log_interval``); the NaN check happens there too, before any checkpoint.
"""

from __future__ import annotations

import math
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from cifar100.config.schema import AugmentConfig
from cifar100.data.augment import ResizeSchedule, mix_batch, one_hot, resize_batch
from cifar100.data.batches import Batches
from cifar100.errors import UserError
from cifar100.evaluation.inference import topk_hits
from cifar100.runtime import distributed, stopping
from cifar100.runtime.stopping import Interrupted
from cifar100.training.ema import ModelEma


class TrainingDiverged(UserError):
    """The loss became NaN or infinite."""


class TrainingInterrupted(Interrupted):
    """A training stage stopped on request after saving its state: the run can resume."""

    def __init__(self, detail: str):
        super().__init__(stopping.requested() or signal.SIGINT, detail)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Categorical cross-entropy on one-hot (or smoothed, or mixed) targets."""
    return torch.sum(-targets * F.log_softmax(logits.float(), dim=1), dim=1).mean()


@dataclass
class EpochState:
    """Where an epoch stands, so that Ctrl-C mid-epoch can resume at the same step."""

    step: int = 0
    loss_sum: float = 0.0
    top1: int = 0
    top5: int = 0
    seen: int = 0

    def summary(self) -> dict[str, float]:
        n = max(self.seen, 1)
        return {"loss": self.loss_sum / n, "top1": self.top1 / n, "top5": self.top5 / n}


class RunningSums:
    """An epoch's loss and top-k sums, added up on the device and read back on request.

    The loss sum is float64 and grows in the same order as the Python float it replaces
    (``sum += loss * n`` per step), so the epoch's numbers are the same to the last digit
    however rarely they are read.
    """

    def __init__(self, state: EpochState, device: torch.device):
        dtype = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
        sums = torch.tensor([state.loss_sum, state.top1, state.top5], dtype=dtype)
        self.sums = sums.to(device, non_blocking=True)  # loss sum, top-1 hits, top-5 hits
        self.seen = state.seen

    def add(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        n = len(labels)
        step = torch.cat(
            [(loss.to(self.sums.dtype) * n).view(1), topk_hits(logits, labels).to(self.sums.dtype)]
        )
        self.sums += step
        self.seen += n

    def read_into(self, state: EpochState) -> None:
        """Copy the sums into ``state`` (one wait for the device); a NaN loss stops here."""
        loss_sum, top1, top5 = self.sums.tolist()
        if not math.isfinite(loss_sum):
            raise TrainingDiverged(f"loss became {loss_sum / self.seen} (by step {state.step})")
        state.loss_sum, state.top1, state.top5 = loss_sum, int(top1), int(top5)
        state.seen = self.seen


def is_sync_step(step: int, steps: int, every: int) -> bool:
    """Where the loop reads its sums back and the ranks agree: every ``every`` steps and at
    the end of the epoch. Counted from the epoch's start, so every rank (and a resumed run)
    stops at the same steps."""
    return step % every == 0 or step == steps


class SoftTargets(Protocol):
    """A teacher's part in a step (``training.distill.loss``): the engine calls it, knowing no
    model. Targets are (B, C) probabilities; ``loss`` gets them after the label targets,
    as one (B, 2C) tensor."""

    # True: ``targets`` runs on the mixed batch (the online teacher); False: its targets
    # belong to the unmixed images and are mixed as the labels are (the cached logits).
    sees_mixed_images: bool

    def targets(self, inputs: torch.Tensor, indices: torch.Tensor) -> torch.Tensor: ...

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor: ...


@dataclass(kw_only=True)
class StepContext:
    """Everything one training step needs besides the model and the batch."""

    optimizer: torch.optim.Optimizer
    num_classes: int
    scheduler: object | None = None  # stepped every batch when not None
    label_smoothing: float = 0.0
    augment: AugmentConfig | None = None
    grad_clip: float | None = None
    ema: ModelEma | None = None
    autocast: torch.dtype | None = None  # bf16 on CUDA; fp32 on CPU (bf16 is emulated there)
    teacher: SoftTargets | None = None  # knowledge distillation: soft targets and their loss
    resize: ResizeSchedule | None = None  # progressive resizing over the epochs
    input_size: int | None = None  # this epoch's side length (from ``resize``); None: as given


def epoch_context(ctx: StepContext, epoch: int, epochs: int) -> StepContext:
    """``ctx`` for epoch ``epoch`` (0-based) of ``epochs``: without MixUp/CutMix in the last
    ``augment.mix_off_epochs``, at the epoch's input size under progressive resizing."""
    augment = ctx.augment
    if augment is not None and epoch >= epochs - augment.mix_off_epochs:
        ctx = replace(ctx, augment=replace(augment, mixup_alpha=0.0, cutmix_alpha=0.0))
    if ctx.resize is not None:
        ctx = replace(ctx, input_size=ctx.resize.size_at(epoch))
    return ctx


def mixed_batch(
    inputs, labels, indices, ctx: StepContext, generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's inputs and targets: labels (smoothed), MixUp/CutMix, and a teacher's
    targets, either mixed like the labels or computed on the mixed images."""
    targets = one_hot(labels, ctx.num_classes, ctx.label_smoothing)
    teacher = ctx.teacher
    if teacher is not None and not teacher.sees_mixed_images:
        targets = torch.cat([targets, teacher.targets(inputs, indices)], dim=1)
    if ctx.augment is not None:
        inputs, targets = mix_batch(inputs, targets, ctx.augment, generator)
    if teacher is not None and teacher.sees_mixed_images:
        targets = torch.cat([targets, teacher.targets(inputs, indices)], dim=1)
    return inputs, targets


def train_step(
    model, inputs, labels, ctx: StepContext, generator, indices: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimisation step. Returns the loss and the logits, detached and unread: reading
    them here would make the host wait for the GPU at every step (see ``RunningSums``).
    ``indices``: the batch's positions in its split (a cached teacher looks them up)."""
    inputs, targets = mixed_batch(inputs, labels, indices, ctx, generator)
    if ctx.input_size is not None:
        # After mixing: an online teacher has seen the full-size images, as it was trained.
        inputs = resize_batch(inputs, ctx.input_size)
    with torch.autocast(
        inputs.device.type, dtype=ctx.autocast or torch.float32, enabled=ctx.autocast is not None
    ):
        logits = model(inputs)
    loss = (
        soft_cross_entropy(logits, targets)
        if ctx.teacher is None
        else ctx.teacher.loss(logits, targets)
    )
    ctx.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if ctx.grad_clip:
        nn.utils.clip_grad_norm_(model.parameters(), ctx.grad_clip)
    ctx.optimizer.step()
    if ctx.scheduler is not None:
        ctx.scheduler.step()
    if ctx.ema is not None:
        ctx.ema.update(model)
    return loss.detach(), logits.detach()


def train_one_epoch(
    model: nn.Module,
    batches: Batches,
    ctx: StepContext,
    *,
    batch_size: int,
    order: torch.Tensor,
    generator: torch.Generator,
    state: EpochState,
    on_pause: Callable[[EpochState], bool],
    desc: str = "",
    sync_every: int = 1,
) -> dict[str, float]:
    """One pass over ``order`` (full batches only), resuming at ``state.step``.

    ``on_pause(state)`` runs after every step; it returns True to stop the epoch early
    (after it has saved a checkpoint): that is how Ctrl-C and timed checkpoints work.
    ``state``'s sums are brought up to date only at sync steps (``is_sync_step`` with
    ``sync_every``), the one place where the host waits for the device: an ``on_pause``
    that saves ``state`` must save there.
    """
    model.train()
    steps = len(order) // batch_size  # drop the ragged last batch: BN prefers full ones
    order = order.to(batches.labels.device, non_blocking=True)  # index where the data lives
    sums = RunningSums(state, batches.device)
    started, first = time.perf_counter(), state.step
    with tqdm(
        total=steps,
        initial=state.step,
        desc=desc,
        file=sys.stderr,
        leave=False,
        dynamic_ncols=True,
        disable=None if distributed.is_main() else True,
    ) as bar:
        while state.step < steps:
            indices = order[state.step * batch_size : (state.step + 1) * batch_size]
            inputs = batches.get(indices, generator)
            labels = batches.labels[indices].to(inputs.device, non_blocking=True)
            loss, logits = train_step(model, inputs, labels, ctx, generator, indices)
            sums.add(loss, logits, labels)
            state.step += 1
            if is_sync_step(state.step, steps, sync_every):
                sums.read_into(state)
                rate = (state.step - first) * batch_size / (time.perf_counter() - started)
                bar.set_postfix(
                    loss=f"{state.loss_sum / state.seen:.3f}", img_s=f"{rate:.0f}", refresh=False
                )
            bar.update(1)
            if on_pause(state):
                raise TrainingInterrupted(f"stopped at step {state.step} of {steps}")
    return state.summary()
