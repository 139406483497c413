"""GPU training throughput of the presets, and the fraction of the GPU's bf16 matmul peak.

For each preset it builds the stage ``cifar100 train`` builds (``build_cnn_stage``; for
MobileNetV2 the fine-tuning stage, with random weights: speed does not depend on them)
and runs the real loop, ``cifar100.training.engine.train_one_epoch``, as training does on CUDA:
uint8 images resident on the GPU and augmented there (the preset's augmentation, MixUp
and CutMix included), bf16 autocast, channels_last, cuDNN autotuning, a fused optimizer,
the weight EMA, host read-backs every ``sync_every`` steps. The images are random uint8.

Figures per preset: training images/s (median of ``--repeats`` timed passes of ``--steps``
steps, the device drained before and after each pass), achieved TFLOP/s (3 x the forward
FLOPs of convolutions and linear layers per image, ``count_flops``), that figure as a
fraction of the bf16 matmul peak measured here (``torch.mm``, 8192 x 8192, bf16), and
evaluation images/s (``predict_logits``, bf16). ``--compile`` adds a torch.compile row.

Without CUDA it says so and exits cleanly; ``--smoke`` runs the same code on the CPU at toy
sizes (fp32), to check the script, not to measure anything.

    python benchmarks/gpu_throughput.py [--presets resnet18-gpu cnn-fast] [--compile]
    python benchmarks/gpu_throughput.py --smoke
"""

from __future__ import annotations

import argparse
import datetime
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from cifar100.config.schema import Config, layered_config
from cifar100.data.cifar import Cifar100, Split, Splits
from cifar100.data.preprocess import Preprocess
from cifar100.evaluation.inference import predict_logits
from cifar100.models import build_model, count_flops, input_size, model_spec
from cifar100.runtime.speed import compile_model, speed_up, sync_interval
from cifar100.training.engine import EpochState, train_one_epoch
from cifar100.training.loop import Run, Stage, eval_model
from cifar100.training.plans import build_cnn_stage

PRESETS = [
    "resnet18-gpu",
    "cnn-fast",
    "mobilenetv2-finetune-gpu",
    "efficientnet-lite0-finetune-gpu",
]


def drain(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(
    fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1
) -> float:
    """Median wall time of ``fn()``, the device's queue drained before and after each call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        drain(device)
        start = time.perf_counter()
        fn()
        drain(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int, repeats: int) -> float:
    """FLOP/s of one n x n x n ``torch.mm`` in ``dtype``: the machine's practical peak."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    seconds = median_seconds(lambda: [torch.mm(a, b) for _ in range(10)], device, repeats, 2)
    return 10 * 2 * n**3 / seconds


def random_run(config: Config, device: torch.device, images: int) -> Run:
    """A ``Run`` over random uint8 images: what ``build_cnn_stage`` and friends need."""
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(images) % 100
    split = Split(
        torch.randint(0, 256, (images, 3, 32, 32), dtype=torch.uint8, generator=g),
        labels,
        labels // 5,
    )
    index = torch.arange(images)
    names = [f"class_{i}" for i in range(100)]
    dataset = Cifar100(split, split, names, names[:20], Path("."))
    spec = model_spec(config.model.name)
    preprocess = Preprocess(input_size(config.model), spec.mean, spec.std).to(device)
    return Run(
        config, Path("."), device, dataset, Splits(split, split, split, index, index), preprocess
    )


def build_stage(run: Run) -> Stage:
    if not model_spec(run.config.model.name).pretrained:
        return build_cnn_stage(run)
    from cifar100.training.transfer import finetune_stage  # the fine-tuning stage, all blocks

    torch.manual_seed(0)
    model = build_model(run.config.model).to(run.device, memory_format=torch.channels_last)
    return finetune_stage(run, model, -1.0)


def measure(preset: str, device: torch.device, args: argparse.Namespace, compiled: bool) -> dict:
    overrides = {"train": {"batch_size": args.batch_size}} if args.batch_size else {}
    config = layered_config(preset, overrides=overrides)
    batch = config.train.batch_size
    run = random_run(config, device, batch * args.steps)
    stage = build_stage(run)
    trained = compile_model(stage.model) if compiled else stage.model
    every = sync_interval(config.train.sync_every, device)
    order = torch.arange(batch * args.steps)
    generator = torch.Generator(device=device).manual_seed(0)

    def epoch() -> None:
        train_one_epoch(
            trained,
            stage.train_batches,
            stage.ctx,
            batch_size=batch,
            order=order,
            generator=generator,
            state=EpochState(),
            on_pause=lambda state: False,
            sync_every=every,
        )

    train_s = median_seconds(epoch, device, args.repeats, warmup=2 if compiled else 1)

    def evaluate():
        return predict_logits(
            eval_model(stage),
            stage.val_batches,
            config.train.eval_batch_size,
            autocast=stage.ctx.autocast,
        )

    eval_s = median_seconds(evaluate, device, args.repeats)
    flops = count_flops(build_model(config.model), input_size(config.model))
    rate = batch * args.steps / train_s
    return {
        "preset": preset,
        "model": config.model.name,
        "size": input_size(config.model),
        "batch": batch,
        "compiled": compiled,
        "every": every,
        "train": rate,
        "flops": 3 * flops * rate,
        "eval": len(stage.val_batches) / eval_s,
    }


def header(device: torch.device, peak: float, peak_name: str) -> None:
    print(f"command: {shlex.join(['python', *sys.argv])}")
    print(f"date:    {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        print(
            f"gpu:     {props.name}, {props.total_memory / 2**30:.0f} GiB, "
            f"compute capability {props.major}.{props.minor}, CUDA {torch.version.cuda}"
        )
    print(f"torch:   {torch.__version__}, python {platform.python_version()}")
    print(f"peak:    {peak / 1e12:.2f} TFLOP/s measured ({peak_name})\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=PRESETS, help="recipes to measure")
    parser.add_argument("--steps", type=int, default=50, help="steps per timed pass")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes (median)")
    parser.add_argument("--batch-size", type=int, help="instead of each preset's")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="no CUDA: run the same code on CPU at toy sizes (not a measurement)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if torch.cuda.is_available():
        device, dtype, n, peak_name = torch.device("cuda"), torch.bfloat16, 8192, "bf16 mm"
        speed_up(device)
    elif args.smoke:
        device, dtype, n, peak_name = torch.device("cpu"), torch.float32, 512, "fp32 mm, smoke"
        args.steps, args.repeats, args.batch_size = 2, 1, args.batch_size or 8
    else:
        print("CUDA is absent: nothing to measure here (--smoke runs the code on the CPU).")
        return 0
    peak = matmul_peak(device, dtype, n, args.repeats)
    header(device, peak, peak_name)
    print(
        f"{'preset':<26} {'model':<12} {'px':>4} {'batch':>5} {'compile':>7} {'sync':>4} | "
        f"{'train img/s':>11} {'TFLOP/s':>8} {'of peak':>7} | {'eval img/s':>10}"
    )
    for preset in args.presets:
        for compiled in (False, True) if args.compile else (False,):
            r = measure(preset, device, args, compiled)
            print(
                f"{r['preset']:<26} {r['model']:<12} {r['size']:>4} {r['batch']:>5} "
                f"{'yes' if r['compiled'] else 'no':>7} {r['every']:>4} | {r['train']:>11,.0f} "
                f"{r['flops'] / 1e12:>8.2f} {r['flops'] / peak:>7.1%} | {r['eval']:>10,.0f}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
