"""Distillation on this machine: the online teacher against the cached one, in images/s.

For one teacher (``--teacher RUN``; several: an ensemble) and a student preset (default
``cnn-fast``), on the real engine pieces (``train_step`` with the preset's augmentation,
its optimizer, channels_last) and the first ``--images`` training images, it times:

- the student's training step alone: the floor;
- the step with the online teacher (``OnlineTeacher``: every teacher runs on every
  augmented batch, eval mode, no grad);
- the step with cached targets (``ViewBatches`` + ``CachedTeacher``: a lookup);
- the cached mode's one-off cost, the teachers' logits of augmented views
  (``fill_logits``), in image views/s.

From these it projects the minutes of ``--epochs`` epochs over ``--train-images`` images
each way: online; cached on its first run (``--views`` views of every image computed,
then training); cached with the logits reused by a later run; and the number of epochs
from which the cached first run wins. Accuracy of each mode comes from real runs, not here.

    nice -n 19 python benchmarks/distill_speed.py --teacher runs/mobilenetv2-finetune \\
        [--student cnn-fast] [--data-dir DIR] [--epochs 40] [--views 8] [--compile]
        [--clock wall|cpu] [--threads N]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

from cifar100.config.schema import DistillConfig, layered_config
from cifar100.data.batches import ImageBatches
from cifar100.data.cifar import load_cifar100
from cifar100.data.preprocess import Preprocess
from cifar100.models import build_model, input_size, model_spec
from cifar100.runs.folders import cpu_name
from cifar100.training.distill.loss import OnlineTeacher
from cifar100.training.distill.teacher_cache import (
    CachedTeacher,
    LogitCache,
    ViewBatches,
    fill_logits,
    view_draws,
    view_policy,
)
from cifar100.training.distill.teachers import TeacherRunner, load_teacher
from cifar100.training.engine import StepContext, train_step
from cifar100.training.optim import make_optimizer

# run as a script, so its own folder is on sys.path: one timing helper for all benchmarks
from augment_speed import median_seconds  # noqa: E402  (isort: skip)

CPU = torch.device("cpu")


def clock(name: str):
    """Wall time, or the process's CPU time spread over its threads (``--clock cpu``)."""
    if name == "wall":
        return time.perf_counter
    return lambda: time.process_time() / torch.get_num_threads()


def step_rate(batches, teacher, config, args) -> float:
    """Training images/s of the student's step, with ``teacher`` (or none)."""
    torch.manual_seed(0)
    model = build_model(config.model).to(memory_format=torch.channels_last).train()
    optimizer = make_optimizer(model.parameters(), config.optim)
    ctx = StepContext(
        optimizer=optimizer,
        scheduler=None,
        num_classes=100,
        label_smoothing=config.optim.label_smoothing,
        augment=config.augment,
    )
    ctx.teacher = teacher
    generator = torch.Generator().manual_seed(0)

    def step() -> None:
        indices = torch.randint(len(batches), (args.batch_size,), generator=generator)
        inputs = batches.get(indices, generator)
        train_step(model, inputs, batches.labels[indices], ctx, generator, indices)

    warmup = 3 if args.compile else 1  # compiling happens on the first calls
    return args.batch_size / median_seconds(step, args.steps, warmup, clock(args.clock))


def extraction_rate(teacher, images, config, args) -> float:
    """Image views/s of computing one teacher's logits for augmented views."""
    runner = TeacherRunner(teacher.trained, 250, None, args.compile)
    runner(images[:250].float() / 255)  # warm-up (and compilation)
    draws = view_draws(config.augment, 1, 0, len(images))
    with tempfile.TemporaryDirectory() as tmp:
        cache = LogitCache(
            Path(tmp) / "logits.pt",
            {},
            torch.zeros(1, len(images), 100, dtype=torch.float16),
            torch.zeros(1, len(images), dtype=torch.bool),
        )
        rows, tick = torch.arange(len(images)), clock(args.clock)
        start = tick()
        fill_logits(cache, lambda n: runner, images, rows, draws, view_policy(config.augment), CPU)
        return len(images) / (tick() - start)


def header(args, teachers) -> None:
    print(f"command: {shlex.join([os.path.basename(sys.executable), *sys.argv])}")
    print(f"date:    {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}")
    print(
        f"cpu:     {cpu_name()}, {os.cpu_count()} logical cores, torch threads "
        f"{torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}"
    )
    print(f"torch:   {torch.__version__}, python {platform.python_version()}, clock {args.clock}")
    for t in teachers:
        meta = t.trained.metadata
        print(f"teacher: {t.source} ({meta.get('model_name')}, {t.trained.preprocess.size} px)")
    print(f"student: preset {args.student}, batch {args.batch_size}, {args.images:,} images\n")


def report(rates: dict[str, float], extract: float, args) -> None:
    for name, rate in rates.items():
        print(f"{name:<34} {rate:8.0f} images/s")
    print(f"{'teacher logits (cached, one-off)':<34} {extract:8.0f} image views/s\n")
    epoch_images, views = args.epochs * args.train_images, args.views * args.train_images
    online = epoch_images / rates["student + online teacher"] / 60
    logits = views / extract / 60
    trained = epoch_images / rates["student + cached targets"] / 60
    print(f"projection: {args.epochs} epochs of {args.train_images:,} images, {args.views} views")
    print(f"  online:             {online:7.1f} min")
    print(f"  cached, first run:  {logits + trained:7.1f} min (logits {logits:.1f} + training)")
    print(f"  cached, reused:     {trained:7.1f} min")
    per_epoch = args.train_images * (
        1 / rates["student + online teacher"] - 1 / rates["student + cached targets"]
    )
    if per_epoch > 0:
        print(f"  the cached first run wins from {logits * 60 / per_epoch:.1f} epochs on")
    else:
        print("  the online teacher is as fast as a lookup here: cached never wins")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    teachers = [load_teacher(source) for source in args.teacher]
    header(args, teachers)
    config = layered_config(args.student)
    dataset = load_cifar100(args.data_dir, download=False)
    split = dataset.train.subset(torch.arange(min(args.images, len(dataset.train))))
    spec = model_spec(config.model.name)
    student = Preprocess(input_size(config.model), spec.mean, spec.std, config.data.standardize)
    distill = DistillConfig(teachers=tuple(args.teacher), views=args.views)
    plain = ImageBatches(split, student, CPU, config.augment)
    nets = [TeacherRunner(t.trained, args.batch_size, None, args.compile) for t in teachers]
    online = OnlineTeacher(distill, 100, nets, student)
    draws = view_draws(config.augment, args.views, 0, len(split))
    logits = [torch.randn(args.views, len(split), 100).half() for _ in teachers]  # timing only
    viewed = ViewBatches(split, student, CPU, view_policy(config.augment), draws, logits)
    rates = {
        "student step alone": step_rate(plain, None, config, args),
        "student + online teacher": step_rate(plain, online, config, args),
        "student + cached targets": step_rate(
            viewed, CachedTeacher(distill, 100, viewed), config, args
        ),
    }
    extract = 1 / sum(1 / extraction_rate(t, split.images, config, args) for t in teachers)
    report(rates, extract, args)
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", nargs="+", required=True, metavar="RUN")
    parser.add_argument("--student", default="cnn-fast", help="student preset (cnn-fast)")
    parser.add_argument("--data-dir", help="folder holding cifar-100-python/")
    parser.add_argument("--images", type=int, default=2000, help="training images timed on")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per setting")
    parser.add_argument("--epochs", type=int, default=40, help="epochs of the projection")
    parser.add_argument("--train-images", type=int, default=40_000, help="of the projection")
    parser.add_argument("--views", type=int, default=8, help="cached views per image")
    parser.add_argument("--compile", action="store_true", help="torch.compile the teachers")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
