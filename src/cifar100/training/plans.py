"""Stage plans: which stages a model trains, named by its ``ModelSpec.plan``.

A plan is a generator ``plan(run) -> Stage, Stage, ...``: the loop
(``cifar100.training.loop.run_stages``) trains each stage before the plan builds the next, so a
later stage can start from what an earlier one left (fine-tuning from the best head).

The registry entry names its plan instead of holding the function because the plans
build models: ``cifar100.models`` importing them would make the registry import the
training code that imports the registry (a cycle), and keep file I/O out of ``models``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

from cifar100.config.schema import Config, ConfigError
from cifar100.data.augment import ResizeSchedule
from cifar100.data.batches import ImageBatches
from cifar100.models import build_model, input_size
from cifar100.training.distill.loss import OnlineTeacher
from cifar100.training.distill.teacher_cache import cached_teacher
from cifar100.training.distill.teachers import (
    TeacherRunner,
    load_teachers,
    record_teachers,
    refuse_changed,
)
from cifar100.training.ema import ModelEma, span_decay
from cifar100.training.engine import SoftTargets, StepContext
from cifar100.training.features import COMPILE_MIN_IMAGES
from cifar100.training.loop import Run, Stage
from cifar100.training.optim import make_optimizer, make_scheduler
from cifar100.training.transfer import transfer_stages, validation_batches

StagePlan = Callable[[Run], Iterator[Stage]]


def build_cnn_stage(run: Run) -> Stage:
    """The one stage of a model trained from scratch (the CNNs, ResNet-18)."""
    config, device = run.config, run.device
    torch.manual_seed(config.train.seed)  # initialisation
    model = build_model(config.model).to(device, memory_format=torch.channels_last)
    train_batches = ImageBatches(run.splits.train, run.preprocess, device, config.augment)
    train_batches, teacher = distillation(run, train_batches)
    val_batches = validation_batches(run)  # None in a refit
    steps = len(train_batches) // config.train.batch_size
    optimizer = make_optimizer(model.parameters(), config.optim)
    scheduler, per_step = make_scheduler(optimizer, config.optim, config.train.epochs, steps)
    ema = None
    if config.train.ema_span is not None:
        decay = span_decay(config.train.ema_span, config.train.epochs * steps)
        ema = ModelEma(model, decay, "mean")
    elif config.train.ema_decay:
        ema = ModelEma(model, config.train.ema_decay, config.train.ema_warmup)
    ctx = StepContext(
        optimizer=optimizer,
        scheduler=scheduler if per_step else None,
        num_classes=len(run.dataset.class_names),
        label_smoothing=config.optim.label_smoothing,
        augment=config.augment,
        grad_clip=config.optim.grad_clip,
        ema=ema,
        autocast=run.autocast,
        teacher=teacher,
        resize=resize_schedule(config),
    )
    return Stage(
        "main",
        model,
        config.train.epochs,
        config.train.batch_size,
        train_batches,
        val_batches,
        ctx,
        plateau=None if per_step else scheduler,
    )


def resize_schedule(config: Config) -> ResizeSchedule | None:
    """Progressive resizing for a model trained from scratch (``train.resize_start``)."""
    train = config.train
    if train.resize_start is None or train.resize_epochs == 0:
        return None
    return ResizeSchedule(train.resize_start, train.resize_epochs, input_size(config.model))


def distillation(run: Run, batches: ImageBatches) -> tuple[Any, SoftTargets | None]:
    """The training batches and the teacher of a distilled run (``distill.teachers``),
    ``batches`` and None otherwise; the teachers go into run.json (and the record)."""
    config = run.config
    if not config.distill.teachers:
        return batches, None
    teachers = load_teachers(config, run.device, run.dataset.class_names)
    refuse_changed(run.run_dir, teachers)  # before any work: a resume keeps its teachers
    if config.distill.mode == "cached":
        batches, teacher, extra = cached_teacher(run, teachers)
    else:
        seen = config.train.epochs * len(batches)  # images each teacher will run on
        compiled = config.distill.compile and run.device.type == "cpu"
        compiled = compiled and seen >= COMPILE_MIN_IMAGES
        nets = [
            TeacherRunner(t.trained, config.train.batch_size, run.autocast, compiled)
            for t in teachers
        ]
        teacher = OnlineTeacher(config.distill, len(run.dataset.class_names), nets, run.preprocess)
        extra = {}
    record_teachers(run.run_dir, config, teachers, extra)
    return batches, teacher


def scratch_stages(run: Run) -> Iterator[Stage]:
    yield build_cnn_stage(run)


PLANS: dict[str, StagePlan] = {"scratch": scratch_stages, "transfer": transfer_stages}


def register_plan(name: str, plan: StagePlan) -> StagePlan:
    """Add a plan that a ``ModelSpec`` can name (e.g. a distillation stage)."""
    PLANS[name] = plan
    return plan


def stage_plan(name: str) -> StagePlan:
    if name not in PLANS:
        raise ConfigError(f"unknown stage plan '{name}' (known: {', '.join(sorted(PLANS))})")
    return PLANS[name]
