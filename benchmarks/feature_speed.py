"""Feature extraction on this CPU: frozen-backbone images/s per input size, precision and
compilation (eager, ``torch.compile``, ``torch.compile`` with Inductor's ``freezing``).

Stage 1 of a transfer run passes every training and validation image through the frozen
backbone once (``cifar100.training.features``), so on a CPU its time is nearly all this
pass. ``cifar100 train`` compiles the backbone with ``freezing`` for 20,000+ images: the
weights become constants, BatchNorm folds into the convolutions and oneDNN packs the
weights once. This script measures what that and ``--precision bf16`` buy here, on random
images of the real shape (the speed does not depend on the pixels), in the same
channels_last batches the extraction runs (250 images, fewer past 160 px), with the
project's malloc setting (``--allocator default`` shows what glibc's own costs: every
batch's activations handed back to the kernel and faulted in again).

    python benchmarks/feature_speed.py [--model efficientnet-lite2] [--sizes 224 240 260]
        [--modes eager compile freeze] [--precisions fp32 bf16] [--seconds 30]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from cifar100.config.schema import ModelConfig
from cifar100.data.batches import capped_batch
from cifar100.models import build_model
from cifar100.models.weights import SOURCES, load_pretrained, resolve_weights, weight_source
from cifar100.training.features import FEATURE_BATCH, CompiledOrEager

# run as a script, so its own folder is on sys.path
from cpu_usage import (  # noqa: E402  (isort: skip)
    add_allocator_option,
    apply_allocator,
    run_settings,
)
from precision_speed import print_header  # noqa: E402  (isort: skip)

MODES = ("eager", "compile", "freeze")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}


def backbone(model_name: str, weights: str | None) -> torch.nn.Module:
    model = build_model(ModelConfig(name=model_name))
    load_pretrained(model, resolve_weights(weights, source=weight_source(model_name)))
    features = model.features.eval()
    features.requires_grad_(False)
    return features


def compiled(features: torch.nn.Module, mode: str) -> torch.nn.Module:
    if mode == "eager":
        return features
    if mode == "freeze":
        return CompiledOrEager(features)  # as `cifar100 train` extracts
    return torch.compile(features, dynamic=False)


@torch.no_grad()
def images_per_second(
    net: torch.nn.Module, size: int, autocast: torch.dtype | None, seconds: float
) -> tuple[float, float]:
    """(images/s over ``seconds`` after two warm-up batches, seconds of the first batch)."""
    images = torch.rand(capped_batch(FEATURE_BATCH, size), 3, size, size).contiguous(
        memory_format=torch.channels_last
    )
    with torch.autocast("cpu", dtype=autocast or torch.float32, enabled=autocast is not None):
        started = time.perf_counter()
        net(images)
        first = time.perf_counter() - started
        net(images)
        started, done = time.perf_counter(), 0
        while time.perf_counter() - started < seconds:
            net(images)
            done += len(images)
    return done / (time.perf_counter() - started), first


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(SOURCES), default="efficientnet-lite2")
    parser.add_argument("--weights", help="weight file (default: as `cifar100 train` finds it)")
    parser.add_argument("--sizes", nargs="+", type=int, default=[224])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    parser.add_argument("--seconds", type=float, default=30.0, help="timed seconds per setting")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    add_allocator_option(parser)
    args = parser.parse_args(argv)
    if args.allocator in ("both", "all"):  # one fresh process per setting
        return run_settings(sys.argv[1:] if argv is None else argv, args.allocator)
    allocator = apply_allocator(args.allocator)
    if args.threads:
        torch.set_num_threads(args.threads)
    print_header()
    print(f"model:   {args.model}, channels_last, no grad, allocator: {allocator}\n")
    print(f"{'size':>4} {'batch':>5} {'precision':>9} {'mode':>8} {'img/s':>7} {'first s':>8}")
    for size in args.sizes:
        for precision in args.precisions:
            for mode in args.modes:
                torch._dynamo.reset()  # each setting compiles afresh
                net = compiled(backbone(args.model, args.weights), mode)
                rate, first = images_per_second(net, size, PRECISIONS[precision], args.seconds)
                batch = capped_batch(FEATURE_BATCH, size)
                print(
                    f"{size:>4} {batch:>5} {precision:>9} {mode:>8} {rate:>7.1f} {first:>8.1f}",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
