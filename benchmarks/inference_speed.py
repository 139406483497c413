"""Inference speed on this machine: batch throughput and single-image latency.

For every registered model (random weights: speed does not depend on them), the full
classifier a user runs, preprocessing included (float [0, 1] 32x32 -> logits), is timed in

* PyTorch, fp32, channels_last, ``torch.inference_mode``;
* onnxruntime (CPU), on the file ``cifar100.deploy.exports.export_onnx`` writes.

Throughput is batch size / median batch time; latency is the median over single images.
Medians, because this CPU may be shared: a neighbour's burst shows up in the mean.

On a busy machine wall-clock figures say more about the neighbours than about the model;
``--clock cpu`` runs on one thread and times with that thread's CPU clock instead, which
other processes do not advance: "images per CPU-second", the uncontended one-core figure.

Usage::

    nice python benchmarks/inference_speed.py [--models cnn-seed cnn-fast] [--batch-size 256]
    nice python benchmarks/inference_speed.py --clock cpu
    nice python benchmarks/inference_speed.py --allocator both   # glibc default vs tuned
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from cifar100.config.schema import ModelConfig
from cifar100.data.preprocess import Preprocess
from cifar100.deploy.exports import export_onnx
from cifar100.models import REGISTRY, build_model, count_parameters, model_spec
from cifar100.runs.folders import hardware

# run as a script, so its own folder is on sys.path
from cpu_usage import (  # noqa: E402  (isort: skip)
    Usage,
    add_allocator_option,
    apply_allocator,
    measured,
    run_settings,
)

CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}


def build_classifier(name: str) -> nn.Module:
    spec = model_spec(name)
    torch.manual_seed(0)
    return nn.Sequential(
        Preprocess(spec.input_size, spec.mean, spec.std), build_model(ModelConfig(name=name))
    ).eval()


def median_seconds(
    fn: Callable[[], object],
    seconds: float,
    min_runs: int,
    warmup: int,
    clock: Callable[[], float] = time.perf_counter,
) -> float:
    """Median time of ``fn`` on ``clock``, over >= ``min_runs`` calls and ``seconds`` (wall)."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - start < seconds:
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return statistics.median(times)


def time_torch(
    classifier: nn.Module, batch: int, seconds: float, clock: Callable[[], float]
) -> tuple[float, float]:
    """(images/s at ``batch``, single-image median ms) in PyTorch fp32 channels_last."""
    model = classifier.to(memory_format=torch.channels_last)
    images = torch.rand(batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    one = images[:1].clone()
    with torch.inference_mode():
        batch_s = median_seconds(lambda: model(images), seconds, 5, 2, clock)
        single_s = median_seconds(lambda: model(one), seconds / 2, 50, 10, clock)
    return batch / batch_s, single_s * 1000


def time_onnx(
    classifier: nn.Module, batch: int, seconds: float, clock: Callable[[], float]
) -> tuple[float, float]:
    """The same measurements in onnxruntime (as many threads as PyTorch uses)."""
    with tempfile.TemporaryDirectory() as folder:
        path = export_onnx(classifier, Path(folder) / "model.onnx", {"benchmark": "1"})
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    images = np.random.default_rng(0).random((batch, 3, 32, 32), dtype=np.float32)
    one = images[:1].copy()
    batch_s = median_seconds(lambda: session.run(None, {name: images}), seconds, 5, 2, clock)
    single_s = median_seconds(lambda: session.run(None, {name: one}), seconds / 2, 50, 10, clock)
    return batch / batch_s, single_s * 1000


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    default_models = [m for m in ("cnn-seed", "cnn-fast", "mobilenetv2") if m in REGISTRY]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models",
        nargs="+",
        default=default_models,
        help=f"registered models (default: {' '.join(default_models)})",
    )
    parser.add_argument("--batch-size", type=int, default=256, help="throughput batch size")
    parser.add_argument(
        "--seconds", type=float, default=4.0, help="minimum timing per measurement (after warm-up)"
    )
    parser.add_argument("--threads", type=int, help="torch and onnxruntime threads")
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall: elapsed time; cpu: one thread, timed by its CPU clock",
    )
    add_allocator_option(parser)
    return parser.parse_args(argv)


def print_header(args: argparse.Namespace, allocator: str) -> None:
    info = hardware(torch.device("cpu"))
    print(f"command: {shlex.join([Path(sys.executable).name, *sys.argv])}")
    print(f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(
        f"hardware: {info['cpu']}, {info['cpu_count']} logical CPUs, "
        f"{torch.get_num_threads()} threads; load average {os.getloadavg()[0]:.2f}"
    )
    print(
        f"software: python {info['python']}, torch {torch.__version__}, "
        f"onnxruntime {ort.__version__}, {info['platform']}"
    )
    print(f"malloc: {allocator}")
    print(
        f"batch {args.batch_size}, float32 input 3x32x32 (preprocessing included), "
        f"{args.clock} clock\n"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.allocator in ("both", "all"):
        return run_settings(sys.argv[1:] if argv is None else argv, args.allocator)
    allocator = apply_allocator(args.allocator)
    if args.clock == "cpu":
        args.threads = 1  # a thread's CPU clock sees only the work done on that thread
    if args.threads:
        torch.set_num_threads(args.threads)
    print_header(args, allocator)
    rate, ms = ("img/s", "1-img ms") if args.clock == "wall" else ("img/CPU-s", "1-img CPU ms")
    print(
        f"{'model':<12} {'params':>9} {'input':>6} | {'torch ' + rate:>15} {ms:>12} | "
        f"{'onnx ' + rate:>14} {ms:>12}"
    )
    usage: dict[str, Usage] = {}
    for name in args.models:
        classifier = build_classifier(name)
        clock = CLOCKS[args.clock]
        with measured(usage.setdefault(name, Usage())):
            torch_rate, torch_ms = time_torch(classifier, args.batch_size, args.seconds, clock)
        onnx_rate, onnx_ms = time_onnx(build_classifier(name), args.batch_size, args.seconds, clock)
        print(
            f"{name:<12} {count_parameters(classifier):>9,} {model_spec(name).input_size:>6} | "
            f"{torch_rate:>15,.0f} {torch_ms:>12.2f} | {onnx_rate:>14,.0f} {onnx_ms:>12.2f}",
            flush=True,
        )
    print("\nCPU time and minor page faults of the PyTorch measurements (warm-up included):")
    for name, used in usage.items():
        print(f"{name:<12} {used}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
