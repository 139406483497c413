"""fp32 or bf16 on this CPU? Training-step throughput of each network under both precisions.

``cifar100 train --precision bf16`` runs every training step under bf16 autocast. On CPUs
with AMX tiles (Xeon Sapphire Rapids and later) or AVX512-BF16, oneDNN runs bf16
convolutions and matmuls natively and a step can be several times faster than in fp32;
elsewhere bf16 is emulated and slower. This script says which case this machine is: it
prints the CPU's bf16 support, the 2048^2 matmul GFLOP/s in both precisions, and for each
network one training step (forward + backward + optimizer, channels_last, the step
``cifar100 train`` runs) in images/s in fp32 and bf16 and their ratio.

Accuracy under bf16 comes from real runs (records whose hardware says "bf16"), not from here.

    python benchmarks/precision_speed.py [--models cnn-fast cnn-fast-60min mobilenetv2 ...]
        [--repeats 4] [--threads N]
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
from collections.abc import Callable

import torch
import torch.nn.functional as F

from cifar100.config.schema import ModelConfig
from cifar100.models import build_model
from cifar100.runs.folders import cpu_name
from cifar100.runtime.speed import cpu_has_native_bf16

# name -> (model settings as the presets train it, input size, batch of the preset)
NETWORKS = {
    "cnn-fast": (ModelConfig(name="cnn-fast", widths=(48, 96, 192, 256)), 32, 256),
    "cnn-fast-60min": (ModelConfig(name="cnn-fast", widths=(64, 128, 256, 384)), 32, 256),
    "mobilenetv2-160": (ModelConfig(name="mobilenetv2", head_hidden=1024, dropout=0.3), 160, 64),
    "efficientnet-lite0-160": (
        ModelConfig(name="efficientnet-lite0", head_hidden=1024, dropout=0.3),
        160,
        64,
    ),
}


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_gflops(dtype: torch.dtype, n: int = 2048) -> float:
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    return 2 * n**3 / median_seconds(lambda: a @ b, repeats=5) / 1e9


def step_rate(name: str, autocast: torch.dtype | None, repeats: int) -> float:
    """Images/s of one training step of ``name`` under ``autocast`` (None: fp32)."""
    config, size, batch = NETWORKS[name]
    torch.manual_seed(0)
    model = build_model(config).to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    images = torch.rand(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 100, (batch,))

    def step() -> None:
        with torch.autocast("cpu", dtype=autocast or torch.float32, enabled=autocast is not None):
            loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return batch / median_seconds(step, repeats)


def print_header() -> None:
    print(f"command: {shlex.join([os.path.basename(sys.executable), *sys.argv])}")
    print(f"date:    {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}")
    print(
        f"cpu:     {cpu_name()}, {os.cpu_count()} logical cores, "
        f"torch threads {torch.get_num_threads()}, native bf16 (AMX or AVX512-BF16): "
        f"{'yes' if cpu_has_native_bf16() else 'no'}"
    )
    print(
        f"torch:   {torch.__version__}, python {platform.python_version()}, "
        f"load average {os.getloadavg()[0]:.1f}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=NETWORKS, default=list(NETWORKS))
    parser.add_argument("--repeats", type=int, default=4, help="timed steps per setting")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print_header()
    fp32, bf16 = matmul_gflops(torch.float32), matmul_gflops(torch.bfloat16)
    print(f"matmul 2048^2: fp32 {fp32:,.0f} GFLOP/s, bf16 {bf16:,.0f} GFLOP/s\n")
    print(f"{'network':<24} {'input':>5} {'batch':>5} {'fp32 img/s':>11} {'bf16 img/s':>11} ratio")
    for name in args.models:
        _, size, batch = NETWORKS[name]
        slow, fast = (
            step_rate(name, None, args.repeats),
            step_rate(name, torch.bfloat16, args.repeats),
        )
        print(f"{name:<24} {size:>5} {batch:>5} {slow:>11.1f} {fast:>11.1f} {fast / slow:5.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
