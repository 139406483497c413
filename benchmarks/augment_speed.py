"""How much of a training step does batched augmentation cost?

Prints images/s of ``augment_batch`` for two recipes at batch 256, next to the time of one
training step (forward + backward + Adam, channels_last) of the custom CNNs, and the ratio.
The issue asks augmentation to stay well under a tenth of a step.

    nice -n 19 python benchmarks/augment_speed.py [--data-dir DIR] [--threads N]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from cifar100.config.schema import AugmentConfig, ModelConfig
from cifar100.data.augment import augment_batch, to_float
from cifar100.models import build_model
from cifar100.runs.folders import cpu_name

RECIPES = {
    "flip+translate 4": AugmentConfig(flip=True, translate=4),
    "seed recipe (flip, rot 15, zoom 0.1, contrast 0.1)": AugmentConfig(
        flip=True, translate=0, rotation=15, zoom=0.1, contrast=0.1
    ),
}
MODELS = ("cnn-seed", "cnn-fast")


def median_seconds(fn, repeats: int, warmup: int = 1, clock=time.perf_counter) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = clock()
        fn()
        times.append(clock() - start)
    return statistics.median(times)


def sample_batch(batch: int, data_dir: str | None) -> torch.Tensor:
    """(B, 3, 32, 32) uint8: real training images when a data folder is given, else noise."""
    if data_dir:
        from cifar100.data.cifar import load_cifar100

        return load_cifar100(data_dir, download=False).train.images[:batch].clone()
    return torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8)


def augment_time(images: torch.Tensor, config: AugmentConfig, repeats: int) -> float:
    generator = torch.Generator().manual_seed(0)
    return median_seconds(lambda: augment_batch(to_float(images), config, generator), repeats)


def step_time(name: str, images: torch.Tensor, repeats: int) -> float:
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name)).to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    inputs = to_float(images).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 100, (len(images),))

    def step() -> None:
        loss = F.cross_entropy(model(inputs), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return median_seconds(step, repeats)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--data-dir", help="folder holding cifar-100-python/ (real images)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=20, help="timed augmentation batches")
    parser.add_argument("--step-repeats", type=int, default=5, help="timed training steps")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"command: {shlex.join([os.path.basename(sys.executable), *sys.argv])}")
    print(f"date:    {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}")
    print(
        f"cpu:     {cpu_name()}, {os.cpu_count()} logical cores, "
        f"torch threads {torch.get_num_threads()}"
    )
    print(
        f"torch:   {torch.__version__}, python {platform.python_version()}, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    images = sample_batch(args.batch, args.data_dir)
    print(f"batch:   {args.batch} images of 3x32x32 ({'real' if args.data_dir else 'noise'})\n")

    augment = {label: augment_time(images, cfg, args.repeats) for label, cfg in RECIPES.items()}
    steps = {name: step_time(name, images, args.step_repeats) for name in MODELS}
    for label, seconds in augment.items():
        print(
            f"to_float + augment_batch, {label}: {seconds * 1e3:.1f} ms/batch, "
            f"{args.batch / seconds:,.0f} images/s"
        )
    for name, seconds in steps.items():
        print(f"train step {name} (fwd+bwd+Adam, channels_last): {seconds * 1e3:.0f} ms/batch")
    print("\naugmentation as a fraction of one training step:")
    for label, aug in augment.items():
        ratios = ", ".join(f"{name} {aug / step:.1%}" for name, step in steps.items())
        print(f"  {label}: {ratios}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
