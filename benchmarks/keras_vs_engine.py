"""Training throughput of the seed CNN: our engine against Keras 3 + TensorFlow, one run.

Both trainers fit the same network (``cnn-seed``: 3 x [2 x Conv3x3-BN-ReLU, MaxPool,
Dropout], global average pooling, Dropout, Dense 100) with Adam on the same CIFAR-100
images, with augmentation off and with the seed's (flip, rotation 15, zoom 0.1, contrast
0.1), at each batch size. The engine runs through ``cifar100.training.engine.train_one_epoch``
(``ImageBatches.get`` + ``train_step``), exactly what ``cifar100 train`` runs. Keras runs
``model.fit`` in a subprocess, because TensorFlow lives in its own virtual environment
(``--keras-python``); the two never run at the same time. A measured fp32 matmul peak
turns images/s into a fraction of what this CPU can do.

    python benchmarks/keras_vs_engine.py --keras-python /work/tfvenv/bin/python

The same file, run with ``--worker keras``, is that subprocess: it imports no torch.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STAGES = ((32, 0.2), (64, 0.3), (128, 0.4))  # width, dropout; two convs per stage (SeedCNN)
NUM_CLASSES = 100
SEED_AUGMENT = {"flip": True, "translate": 0, "rotation": 15.0, "zoom": 0.1, "contrast": 0.1}
TARGET_RATIO = 1.5


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data-dir", default="/work/shared/datasets", help="folder holding cifar-100-python/"
    )
    parser.add_argument(
        "--keras-python",
        default=sys.executable,
        help="interpreter with tensorflow + keras 3 (default: this one)",
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--steps", type=int, default=30, help="timed steps per repeat")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats (median kept)")
    parser.add_argument(
        "--threads",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="intra-op threads for both frameworks (default: usable CPUs)",
    )
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="wall: images/s; cpu: images per CPU-second of the process, "
        "which other programs on a shared machine barely change",
    )
    parser.add_argument("--skip-keras", action="store_true", help="measure the engine only")
    parser.add_argument("--worker", choices=["keras"], help=argparse.SUPPRESS)
    parser.add_argument("--npz", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def tick(args: argparse.Namespace):
    """The clock: wall time, or the CPU time of every thread of this process."""
    return time.process_time if args.clock == "cpu" else time.perf_counter


def sample_rates(run, batch: int, args: argparse.Namespace) -> list[float]:
    """images/s of each timed repeat; ``run(steps)`` trains that many steps."""
    clock = tick(args)
    run(args.warmup)  # first calls allocate, trace and tune kernels: not what we measure
    rates = []
    for _ in range(args.repeats):
        started = clock()
        run(args.steps)
        rates.append(batch * args.steps / (clock() - started))
    return rates


def configs(args: argparse.Namespace) -> list[tuple[bool, int]]:
    return [(augment, batch) for augment in (False, True) for batch in args.batch_sizes]


# ---- the Keras worker (runs under --keras-python; no torch here) ----


def keras_model(augment: bool):
    """The seed network in Keras 3, with the seed's augmentation layers when ``augment``."""
    import keras
    from keras import layers

    front = [
        layers.RandomFlip("horizontal"),
        layers.RandomRotation(15 / 360),
        layers.RandomZoom(0.1),
        layers.RandomContrast(0.1, value_range=(0, 1)),
    ]
    body = []
    for width, dropout in STAGES:
        for _ in range(2):  # BN momentum/epsilon as PyTorch's, so both run the same maths
            body += [
                layers.Conv2D(width, 3, padding="same", use_bias=False),
                layers.BatchNormalization(momentum=0.9, epsilon=1e-5),
                layers.ReLU(),
            ]
        body += [layers.MaxPooling2D(2), layers.Dropout(dropout)]
    head = [layers.GlobalAveragePooling2D(), layers.Dropout(0.5), layers.Dense(NUM_CLASSES)]
    model = keras.Sequential([keras.Input((32, 32, 3)), *(front if augment else []), *body, *head])
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.CategoricalCrossentropy(from_logits=True),
    )
    return model


def keras_worker(args: argparse.Namespace) -> None:
    import numpy as np
    import tensorflow as tf

    # Before any op runs: TensorFlow fixes its thread pools on first use.
    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    import keras

    data = np.load(args.npz)
    images = data["images"].astype(np.float32) / 255.0  # (N, 32, 32, 3) in [0, 1]
    targets = np.eye(NUM_CLASSES, dtype=np.float32)[data["labels"]]  # one-hot (N, 100)
    results, counts = [], {}
    for augment, batch in configs(args):
        model = keras_model(augment)
        counts = {
            "trainable": int(sum(np.prod(w.shape) for w in model.trainable_weights)),
            "non_trainable": int(sum(np.prod(w.shape) for w in model.non_trainable_weights)),
        }
        batches = tf.data.Dataset.from_tensor_slices((images, targets)).batch(
            batch, drop_remainder=True
        )

        def run(steps: int, model=model, batches=batches) -> None:
            model.fit(
                batches.take(steps).prefetch(tf.data.AUTOTUNE), epochs=1, verbose=0, shuffle=False
            )

        rates = sample_rates(run, batch, args)
        results.append(
            {
                "augment": augment,
                "batch": batch,
                "rates": rates,
                "jit_compile": bool(model.jit_compile),
            }
        )
        print(
            f"  keras  augment={augment!s:5} batch={batch:3}: "
            f"{statistics.median(rates):7.0f} images/s",
            file=sys.stderr,
            flush=True,
        )
    Path(args.out).write_text(
        json.dumps(
            {
                "tensorflow": tf.__version__,
                "keras": keras.__version__,
                "params": counts,
                "results": results,
            }
        )
    )


# ---- the engine side (the project's venv) ----


def engine_runner(split, order, batch: int, augment: bool):
    """``run(steps)`` for the real training loop on a fresh cnn-seed, Adam 1e-3."""
    import torch

    from cifar100.config.schema import AugmentConfig, ModelConfig
    from cifar100.data.batches import ImageBatches
    from cifar100.data.preprocess import Preprocess
    from cifar100.models import build_model, model_spec
    from cifar100.training.engine import EpochState, StepContext, train_one_epoch

    spec = model_spec("cnn-seed")
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="cnn-seed")).to(memory_format=torch.channels_last)
    aug = AugmentConfig(**SEED_AUGMENT) if augment else None
    batches = ImageBatches(
        split, Preprocess(spec.input_size, spec.mean, spec.std), torch.device("cpu"), aug
    )
    ctx = StepContext(
        optimizer=torch.optim.Adam(model.parameters(), lr=1e-3),
        scheduler=None,
        num_classes=NUM_CLASSES,
        label_smoothing=0.0,
        augment=aug,
    )
    generator = torch.Generator().manual_seed(0)

    def run(steps: int) -> None:
        train_one_epoch(
            model,
            batches,
            ctx,
            batch_size=batch,
            order=order[: steps * batch],
            generator=generator,
            state=EpochState(),
            on_pause=lambda state: False,
        )

    return run


def forward_flops(model) -> int:
    """Multiply-adds x 2 of Conv2d and Linear layers for one 32x32 image (hooks count them)."""
    import torch
    from torch import nn

    total = 0

    def count(module, inputs, output) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            per_output = (
                module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
            )
        else:
            per_output = module.in_features
        total += 2 * output.numel() * per_output

    hooks = [
        m.register_forward_hook(count)
        for m in model.modules()
        if isinstance(m, nn.Conv2d | nn.Linear)
    ]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, 32, 32))
    for hook in hooks:
        hook.remove()
    return total


def matmul_peak(clock, n: int = 2048, calls: int = 5, repeats: int = 5) -> float:
    """Best fp32 GFLOP/s of torch.mm on n x n matrices: the ceiling a trainer can approach."""
    import torch

    a, b, c = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)
    torch.mm(a, b, out=c)
    best = 0.0
    for _ in range(repeats):
        started = clock()
        for _ in range(calls):
            torch.mm(a, b, out=c)
        best = max(best, 2 * n**3 * calls / (clock() - started))
    return best / 1e9


def hardware() -> str:
    blocks = [
        dict(line.split(":", 1) for line in block.splitlines() if ":" in line)
        for block in Path("/proc/cpuinfo").read_text().split("\n\n")
        if block.strip()
    ]
    blocks = [{k.strip(): v.strip() for k, v in b.items()} for b in blocks]
    name = blocks[0].get("model name", platform.processor()) if blocks else platform.machine()
    cores = len({(b.get("physical id"), b.get("core id")) for b in blocks}) or os.cpu_count()
    return (
        f"{name}; {cores} physical cores, {os.cpu_count()} hardware threads, "
        f"{len(os.sched_getaffinity(0))} usable by this process"
    )


def run_keras(args: argparse.Namespace, split, order, workdir: Path) -> dict:
    import numpy as np

    needed = max(args.steps, args.warmup) * max(args.batch_sizes)
    chosen = order[:needed]  # the very images, in the order, the engine trains on
    np.savez(
        workdir / "data.npz",
        images=split.images[chosen].permute(0, 2, 3, 1).numpy(),
        labels=split.labels[chosen].numpy(),
    )
    command = [
        args.keras_python,
        __file__,
        "--worker",
        "keras",
        "--npz",
        str(workdir / "data.npz"),
        "--out",
        str(workdir / "keras.json"),
        "--batch-sizes",
        *map(str, args.batch_sizes),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--repeats",
        str(args.repeats),
        "--threads",
        str(args.threads),
        "--clock",
        args.clock,
    ]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(command, env=env, check=False)
    if done.returncode != 0:
        raise SystemExit(f"keras worker failed (exit {done.returncode}): {shlex.join(command)}")
    return json.loads((workdir / "keras.json").read_text())


def table(rows: list[dict], fwd_flops: int, peak: float) -> list[str]:
    lines = [
        f"{'framework':<10}{'augment':<9}{'batch':>6}{'images/s':>10}{'spread':>14}"
        f"{'GFLOP/s':>9}{'% peak':>8}"
    ]
    for row in rows:
        ips = statistics.median(row["rates"])
        gflops = ips * 3 * fwd_flops / 1e9  # training ~ forward + 2x backward
        spread = f"{min(row['rates']):.0f}-{max(row['rates']):.0f}"
        lines.append(
            f"{row['framework']:<10}{'on' if row['augment'] else 'off':<9}"
            f"{row['batch']:>6}{ips:>10.0f}{spread:>14}{gflops:>9.1f}"
            f"{100 * gflops / peak:>7.1f}%"
        )
    return lines


def ratios(rows: list[dict]) -> list[str]:
    rate = {(r["framework"], r["augment"], r["batch"]): statistics.median(r["rates"]) for r in rows}
    lines = []
    for (framework, augment, batch), ips in rate.items():
        keras = rate.get(("keras", augment, batch))
        if framework == "engine" and keras:
            verdict = "meets" if ips / keras >= TARGET_RATIO else "MISSES"
            lines.append(
                f"engine/keras  augment {'on ' if augment else 'off'} batch {batch:>3}: "
                f"{ips / keras:5.2f}x  ({verdict} the {TARGET_RATIO}x target)"
            )
    return lines


def measure_engine(args: argparse.Namespace, split, order) -> list[dict]:
    rows = []
    for augment, batch in configs(args):
        rates = sample_rates(engine_runner(split, order, batch, augment), batch, args)
        rows.append({"framework": "engine", "augment": augment, "batch": batch, "rates": rates})
        print(
            f"  engine augment={augment!s:5} batch={batch:3}: "
            f"{statistics.median(rates):7.0f} images/s",
            file=sys.stderr,
            flush=True,
        )
    return rows


def main(args: argparse.Namespace) -> None:
    import torch

    from cifar100.config.schema import ModelConfig
    from cifar100.data.cifar import load_cifar100
    from cifar100.models import build_model

    torch.set_num_threads(args.threads)
    print("command:", shlex.join([sys.executable, *sys.argv]), f"(nice {os.nice(0)})")
    print("date:", datetime.datetime.now().astimezone().isoformat(timespec="seconds"))
    print("hardware:", hardware(), "| load average at start:", os.getloadavg())
    split = load_cifar100(args.data_dir, download=False).train
    order = torch.randperm(len(split), generator=torch.Generator().manual_seed(0))
    model = build_model(ModelConfig(name="cnn-seed"))
    params = sum(p.numel() for p in model.parameters())
    stats = sum(b.numel() for name, b in model.named_buffers() if "running" in name)
    fwd_flops, peak = forward_flops(model), matmul_peak(tick(args))
    rows = measure_engine(args, split, order)
    versions = f"torch {torch.__version__}"
    if not args.skip_keras:
        with tempfile.TemporaryDirectory() as workdir:
            keras = run_keras(args, split, order, Path(workdir))
        rows += [{"framework": "keras", **r} for r in keras["results"]]
        versions += f", tensorflow {keras['tensorflow']}, keras {keras['keras']}"
        print(
            f"parameters: engine {params:,} trainable + {stats:,} BN statistics; keras "
            f"{keras['params']['trainable']:,} trainable + "
            f"{keras['params']['non_trainable']:,} non-trainable"
        )
        assert keras["params"] == {"trainable": params, "non_trainable": stats}, "models differ"
        jit = {r["jit_compile"] for r in keras["results"]}
        versions += f" (model.fit, XLA jit_compile={', '.join(map(str, sorted(jit)))})"
    print("versions:", versions, f"| threads {args.threads}")
    print(
        f"model: cnn-seed, {fwd_flops / 1e6:.1f} MFLOP forward per image, training counted "
        f"as 3x; fp32 matmul peak (torch.mm 2048x2048): {peak:.1f} GFLOP/s"
    )
    per = "CPU-second of the process, all threads" if args.clock == "cpu" else "wall second"
    print(
        f"timing: {args.warmup} warm-up steps, then {args.repeats} x {args.steps} steps; "
        f"images/s (per {per}) is the median, spread the min-max"
    )
    print("\n".join(table(rows, fwd_flops, peak) + ratios(rows)))
    print("load average at end:", os.getloadavg())


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.worker == "keras":
        keras_worker(arguments)
    else:
        main(arguments)
