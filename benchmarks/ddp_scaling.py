"""Data-parallel scaling: one process with T threads vs T processes with one thread each.

Times the real training step (``cifar100.training.engine.train_step``: batched augmentation,
forward, backward, SGD; under DDP the gradient all-reduce) at the same *global* batch, so
both set-ups do the same arithmetic per step and the difference is how it is spread:
intra-op threads in one process, or one process per core with gloo all-reducing the
gradients. On a machine with CUDA GPUs it also times 1 GPU vs all of them (nccl).

On CPU both set-ups use the same cores, so the efficiency is (DDP images/s) / (threaded
images/s): 1.0 means DDP costs nothing over threads. On GPU it is the classic scaling
efficiency, (N-GPU images/s) / (N x 1-GPU images/s).

Figures are medians over steps, best of a few alternating rounds: a shared machine's
neighbours only ever slow a set-up down.

    nice -n 19 python benchmarks/ddp_scaling.py [--batch-size 256] [--steps 12] [--threads 2]
        [--model cnn-fast] [--widths 48 96 192 256] [--rounds 2]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cifar100.config.schema import AugmentConfig, ModelConfig, OptimConfig
from cifar100.data.batches import ImageBatches
from cifar100.data.cifar import Split
from cifar100.data.preprocess import Preprocess
from cifar100.models import build_model
from cifar100.runtime import distributed
from cifar100.training.engine import StepContext, train_step
from cifar100.training.optim import make_optimizer

AUGMENT = AugmentConfig(flip=True, translate=2)  # the quick preset's


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batches(n: int, device: torch.device) -> ImageBatches:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 100, (n,), generator=g)
    split = Split(images, labels, labels // 5)
    return ImageBatches(split, Preprocess(32, (0.5,) * 3, (0.25,) * 3).to(device), device, AUGMENT)


def worker(rank: int, world: int, threads: int, port: int, args, device_type: str, out) -> None:
    torch.set_num_threads(threads)
    device = torch.device(device_type)
    if world > 1:
        backend = "nccl" if device_type == "cuda" else "gloo"
        dist.init_process_group(
            backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
        )
    if device_type == "cuda":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    torch.manual_seed(0)
    model = build_model(ModelConfig(args.model, tuple(args.widths) if args.widths else None))
    model = model.to(device, memory_format=torch.channels_last)
    optimizer = make_optimizer(model.parameters(), OptimConfig(optimizer="sgd", lr=0.05))
    autocast = torch.bfloat16 if device_type == "cuda" else None
    ctx = StepContext(
        optimizer=optimizer,
        scheduler=None,
        num_classes=100,
        label_smoothing=0.0,
        augment=AUGMENT,
        autocast=autocast,
    )
    model = distributed.wrap_model(model, device).train()
    per_rank = args.batch_size // world
    batches = _batches(args.batch_size, device)
    mine = torch.arange(rank * per_rank, (rank + 1) * per_rank)
    generator = torch.Generator(device=device).manual_seed(rank)
    times = []
    for step in range(args.warmup + args.steps):
        distributed.barrier()  # every rank starts the step together
        if device_type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        inputs = batches.get(mine, generator)
        train_step(model, inputs, batches.labels[mine].to(device), ctx, generator)
        if device_type == "cuda":
            torch.cuda.synchronize()  # train_step no longer reads the loss back: wait here
        distributed.barrier()
        if step >= args.warmup:
            times.append(time.perf_counter() - started)
    if rank == 0:
        out.put(args.batch_size / statistics.median(times))
    if world > 1:
        dist.destroy_process_group()


def measure(world: int, threads: int, args, device_type: str = "cpu") -> float:
    ctx = mp.get_context("spawn")
    out = ctx.SimpleQueue()
    mp.spawn(
        worker, args=(world, threads, _free_port(), args, device_type, out), nprocs=world, join=True
    )
    return out.get()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="cnn-fast")
    parser.add_argument("--widths", type=int, nargs="*", help="default: the model's")
    parser.add_argument("--batch-size", type=int, default=256, help="the global batch")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--threads",
        type=int,
        default=2,
        help="CPU cores to use: 1 process x N threads vs N processes x 1",
    )
    args = parser.parse_args()
    print(
        f"# {datetime.datetime.now():%Y-%m-%d %H:%M}  {platform.machine()}, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, torch "
        f"{torch.__version__}; {args.model} widths {args.widths or 'default'}, global batch "
        f"{args.batch_size}, median of {args.steps} steps, best of {args.rounds} rounds"
    )
    n, one, many = args.threads, 0.0, 0.0
    for _ in range(args.rounds):  # alternate, keep each set-up's best: neighbours only slow
        one = max(one, measure(1, n, args))
        many = max(many, measure(n, 1, args))
    print(f"cpu  1 process x {n} threads : {one:8.1f} images/s")
    print(f"cpu  {n} processes x 1 thread: {many:8.1f} images/s (gloo DDP)")
    print(f"cpu  efficiency (DDP / threads, same cores): {many / one:.2f}")
    gpus = torch.cuda.device_count()
    if gpus:
        single = measure(1, 1, args, "cuda")
        print(f"gpu  1 x {torch.cuda.get_device_name(0)}: {single:8.1f} images/s")
        if gpus > 1:
            all_gpus = measure(gpus, 1, args, "cuda")
            print(
                f"gpu  {gpus} GPUs (nccl DDP): {all_gpus:8.1f} images/s, scaling efficiency "
                f"{all_gpus / (gpus * single):.2f}"
            )
        else:
            print("gpu  only one GPU here: no multi-GPU figure")


if __name__ == "__main__":
    main()
