"""Transfer on this machine: what each input size costs per backbone, and what caching saves.

For one pretrained backbone (``--model``: mobilenetv2, efficientnet-lite0) and each input
size it times, on the real engine pieces (channels_last, fp32):

- the frozen backbone's forward pass (feature extraction, eval mode, no grad), eager and,
  with ``--compile``, under ``torch.compile`` as ``cifar100 train`` runs it;
- one fine-tuning step of the whole network (forward + backward + AdamW, batch 64) and
  one with only the top ``--top-blocks`` feature blocks unfrozen;
- one stage-1 epoch of the head on cached features (40,000 x 1280, batch 256), which
  does not depend on the input size.

From these it projects the minutes of a stage-1 run of ``--stage1-epochs`` epochs with the
feature cache (extract 50,000 images and their mirrors once, then train the head) and
without it (run the frozen backbone over the 40,000 training images every epoch), the
speed-up the cache gives, and the minutes of one fine-tuning epoch (train + validation).
Accuracy per size comes from real runs (``results/*-stage1-*.json``), not from here.

It also prints, per size, the user and system CPU time and the minor page faults of the
timed work: system time far above a few percent of user time means memory is being handed
back to the kernel and faulted in again (see ``cifar100.runtime.allocator``). ``--allocator both``
runs everything once with glibc's default and once with the project's setting.

On a shared machine, ``--clock cpu`` times with the process's CPU seconds divided by its
torch threads: what an idle machine with that many cores would take if the threads scaled
perfectly (so slightly optimistic), and far less disturbed by other programs.

    python benchmarks/transfer_speed.py [--model NAME] [--sizes 96 128 160 224] [--compile]
        [--threads N] [--clock wall|cpu] [--allocator tuned|default|environ|both|all]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import sys
import time

import torch
import torch.nn.functional as F

from cifar100.config.schema import ModelConfig
from cifar100.models import REGISTRY, build_model
from cifar100.models.backbone import freeze_backbone, trainable_parameters, unfreeze
from cifar100.runs.folders import cpu_name

# run as a script, so its own folder is on sys.path: one timing helper for all benchmarks
from augment_speed import median_seconds  # noqa: E402  (isort: skip)
from cpu_usage import (  # noqa: E402  (isort: skip)
    Usage,
    add_allocator_option,
    apply_allocator,
    measured,
    run_settings,
)

TRAIN_IMAGES, VAL_IMAGES, ALL_TRAIN_IMAGES = 40_000, 10_000, 50_000
EXTRACT_BATCH, FINETUNE_BATCH, HEAD_BATCH = 250, 64, 256


def backbone_model(args) -> torch.nn.Module:
    torch.manual_seed(0)
    config = ModelConfig(name=args.model, head_hidden=1024, dropout=0.3)
    return build_model(config).to(memory_format=torch.channels_last)


def clock(args):
    """Wall time, or the process's CPU time spread over its threads (``--clock cpu``)."""
    if args.clock == "wall":
        return time.perf_counter
    return lambda: time.process_time() / torch.get_num_threads()


def images_of(size: int, batch: int) -> torch.Tensor:
    return torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)


def extract_rate(size: int, compiled: bool, args) -> float:
    """Images/s of the frozen backbone's forward pass (what feature caching runs once)."""
    backbone = backbone_model(args).features.eval()
    if compiled:
        backbone = torch.compile(backbone, dynamic=False)
    images = images_of(size, EXTRACT_BATCH)
    with torch.no_grad():
        seconds = median_seconds(
            lambda: backbone(images), args.repeats, warmup=2 if compiled else 1, clock=clock(args)
        )
    return EXTRACT_BATCH / seconds


def finetune_rate(size: int, top_blocks: int | None, args) -> float:
    """Images/s of a training step with the top ``top_blocks`` blocks (None: all) unfrozen."""
    model = backbone_model(args)
    freeze_backbone(model)
    unfreeze(model, top_blocks)
    model.train()
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=1e-4)
    images, labels = images_of(size, FINETUNE_BATCH), torch.randint(0, 100, (FINETUNE_BATCH,))

    def step() -> None:
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return FINETUNE_BATCH / median_seconds(step, args.repeats, warmup=2, clock=clock(args))


def head_epoch_seconds(args) -> float:
    """One stage-1 epoch of the head (dropout + MLP) on 40,000 cached feature vectors."""
    head = backbone_model(args).classifier.train()
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-3)
    features, labels = torch.randn(TRAIN_IMAGES, 1280), torch.randint(0, 100, (TRAIN_IMAGES,))

    def epoch() -> None:
        for start in range(0, TRAIN_IMAGES, HEAD_BATCH):
            loss = F.cross_entropy(
                head(features[start : start + HEAD_BATCH]), labels[start : start + HEAD_BATCH]
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    return median_seconds(epoch, repeats=min(args.repeats, 3), clock=clock(args))


def print_header(args, allocator: str) -> None:
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
    print(f"malloc:  {allocator}")
    print(f"model:   {args.model}, clock {args.clock}\n")


def report(size: int, args, head_seconds: float) -> tuple[Usage, Usage]:
    """Print one size's row; return the CPU usage of its extraction and fine-tuning parts."""
    extraction, finetuning = Usage(), Usage()
    with measured(extraction):
        eager = extract_rate(size, False, args)
        compiled = extract_rate(size, True, args) if args.compile else None
    extract = compiled or eager
    with measured(finetuning):
        full, top = finetune_rate(size, None, args), finetune_rate(size, args.top_blocks, args)
    cached = (2 * ALL_TRAIN_IMAGES / extract + args.stage1_epochs * head_seconds) / 60
    uncached = args.stage1_epochs * (TRAIN_IMAGES / eager + head_seconds) / 60
    epoch_full = (TRAIN_IMAGES / full + VAL_IMAGES / extract) / 60
    epoch_top = (TRAIN_IMAGES / top + VAL_IMAGES / extract) / 60
    compiled_text = f"{compiled:6.0f}" if compiled else "     -"
    print(
        f"{size:4d} px | {eager:6.0f} | {compiled_text} | {full:6.1f} | {top:6.1f} | "
        f"{cached:6.1f} | {uncached:6.1f} | {uncached / cached:5.1f}x | "
        f"{epoch_full:5.1f} | {epoch_top:5.1f}",
        flush=True,
    )
    return extraction, finetuning


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        default="mobilenetv2",
        choices=sorted(n for n, spec in REGISTRY.items() if spec.pretrained),
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[96, 128, 160, 224])
    parser.add_argument("--compile", action="store_true", help="also time compiled extraction")
    parser.add_argument("--top-blocks", type=int, default=6, help="partial fine-tuning depth")
    parser.add_argument("--stage1-epochs", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="cpu: process CPU seconds / threads (shared machines)",
    )
    add_allocator_option(parser)
    args = parser.parse_args(argv)
    if args.allocator in ("both", "all"):
        return run_settings(sys.argv[1:] if argv is None else argv, args.allocator)
    allocator = apply_allocator(args.allocator)
    if args.threads:
        torch.set_num_threads(args.threads)
    print_header(args, allocator)
    head_seconds = head_epoch_seconds(args)
    print(
        f"stage-1 head epoch on cached features (40,000 x 1280, batch {HEAD_BATCH}): "
        f"{head_seconds:.1f} s\n"
    )
    print(
        "images/s: extraction eager | compiled, fine-tune step all blocks | top "
        f"{args.top_blocks} (batch {FINETUNE_BATCH});\nminutes: stage 1 ({args.stage1_epochs} "
        "epochs) cached | uncached, cache speed-up, one fine-tune epoch all | top\n"
    )
    print("  size |  eager | compil |  ft all | ft top | s1 cch | s1 unc | speed | ep all | ep top")
    usage = {size: report(size, args, head_seconds) for size in args.sizes}
    print("\nCPU time and minor page faults of the timed work (warm-up included):")
    for size, (extraction, finetuning) in usage.items():
        print(f"{size:4d} px | extraction {extraction} | fine-tune steps {finetuning}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
