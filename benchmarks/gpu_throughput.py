"""GPU training throughput of the presets under each speed lever, against the GPU's bf16 peak.

For each preset it builds the stage ``cifar100 train`` builds (``build_cnn_stage``; for the
fine-tuning presets the fine-tuning stage, with random weights: speed does not depend on
them) and runs the real loop, ``cifar100.training.engine.train_one_epoch``, as training does
on CUDA: uint8 images resident on the GPU and augmented there (the preset's augmentation,
MixUp and CutMix included), bf16 autocast, channels_last, cuDNN autotuning, a fused
optimizer, the weight EMA, host read-backs every ``sync_every`` steps. The images are random.

Each row is one preset under one lever (``LEVERS``): eager as training runs today, then
``torch.compile`` in its three modes (``train.compile_mode``; ``reduce-overhead`` is CUDA
graphs), contiguous memory instead of channels_last, and BatchNorm computed in fp32 instead
of on the bf16 activations autocast hands it. Figures per row: training images/s (median of
``--repeats`` timed passes of ``--steps`` steps, the device drained before and after each
pass), achieved TFLOP/s (3 x the forward FLOPs of convolutions and linear layers per image,
``count_flops``) and its fraction of the bf16 matmul peak measured here (``torch.mm``,
8192 x 8192), the compile time (the first pass less a timed one), and what compiling made
(graphs, graph breaks, CUDA graphs skipped). A compiler failure is the row's ``error``,
never a silent eager run. ``--json`` writes every row into one file, rewritten after each
row, so a run cut short keeps what it measured.

Without CUDA it says so and exits cleanly; ``--smoke`` runs the same rows on the CPU at toy
sizes (bf16 autocast, torch.compile with dynamo's ``eager`` backend), to check the script,
not to measure anything.

    python benchmarks/gpu_throughput.py [--presets resnet18-gpu cnn-fast] [--levers ...]
        [--json gpu_throughput.json] [--budget-s 240]
    python benchmarks/gpu_throughput.py --smoke --json /tmp/smoke.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from cifar100.config.schema import Config, layered_config
from cifar100.data.cifar import Cifar100, Split, Splits
from cifar100.data.preprocess import Preprocess
from cifar100.evaluation.inference import predict_logits
from cifar100.models import build_model, count_flops, input_size, model_spec
from cifar100.runtime.speed import compile_model, speed_up, sync_interval
from cifar100.training.engine import EpochState, train_one_epoch
from cifar100.training.loop import Run, Stage, eval_model
from cifar100.training.plans import build_cnn_stage

PRESETS = ["resnet18-gpu", "cnn-fast"]


@dataclass(frozen=True)
class Lever:
    """One way of running the training step; ``decides`` says what its row settles."""

    compile_mode: str | None = None  # a torch.compile mode; None: eager
    channels_last: bool = True  # the training path always uses channels_last
    bn_fp32: bool = False  # BatchNorm upcast to fp32 (its output cast back to bf16)
    decides: str = ""


# Quickest first: a run cut short by --budget-s still has the rows that matter most.
LEVERS = {
    "eager": Lever(decides="the baseline: the training path as it runs on CUDA today"),
    "compile": Lever(
        compile_mode="default",
        decides="train.compile=true as a CUDA default: its img/s gain against its compile_s",
    ),
    "compile-cudagraphs": Lever(
        compile_mode="reduce-overhead",
        decides="train.compile_mode=reduce-overhead: CUDA graphs remove the launch overhead "
        "that holds back the small cnn-fast (see cudagraph_skips)",
    ),
    "contiguous": Lever(
        channels_last=False,
        decides="whether channels_last still pays (the training path always uses it)",
    ),
    "bn-fp32": Lever(
        bn_fp32=True,
        decides="what BatchNorm in fp32 costs against BN on bf16 activations (fp32 "
        "statistics and affine), which is what bf16 autocast runs",
    ),
    "compile-max-autotune": Lever(
        compile_mode="max-autotune-no-cudagraphs",
        decides="train.compile_mode=max-autotune-no-cudagraphs: autotuned kernels, "
        "worth its longer compile_s only on long runs",
    ),
}


def drain(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_passes(
    fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1
) -> tuple[float, float]:
    """(first warm-up pass, median timed pass) in seconds, the device's queue drained
    before and after each call. The first pass carries compiling and cuDNN autotuning."""
    times = []
    for _ in range(warmup + repeats):
        drain(device)
        start = time.perf_counter()
        fn()
        drain(device)
        times.append(time.perf_counter() - start)
    return times[0], statistics.median(times[warmup:])


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int, repeats: int) -> float:
    """FLOP/s of one n x n x n ``torch.mm`` in ``dtype``: the machine's practical peak."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    _, seconds = timed_passes(lambda: [torch.mm(a, b) for _ in range(10)], device, repeats, 2)
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


def norm_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def compute_bn_in_fp32(model: nn.Module, autocast: torch.dtype | None) -> None:
    """Each BatchNorm gets fp32 input and hands the next layer ``autocast``'s dtype back,
    so only the normalisation itself changes precision."""
    for norm in norm_layers(model):
        norm.register_forward_pre_hook(lambda _, args: (args[0].float(), *args[1:]))
        if autocast is not None:
            norm.register_forward_hook(lambda _, args, out: out.to(autocast))


def bn_input_dtype(
    model: nn.Module, autocast: torch.dtype | None, size: int, device: torch.device
) -> str | None:
    """The dtype the first BatchNorm computes in, seen by one forward pass under the
    training autocast (None: the model has no BatchNorm)."""
    norms = norm_layers(model)
    if not norms:
        return None
    seen: list[torch.dtype] = []
    probe = norms[0].register_forward_pre_hook(lambda _, args: seen.append(args[0].dtype))
    x = torch.randn(2, 3, size, size, device=device)
    was_training = model.training
    try:
        with (
            torch.no_grad(),
            torch.autocast(device.type, dtype=autocast or torch.float32, enabled=bool(autocast)),
        ):
            model.eval()(x)
    finally:
        probe.remove()
        model.train(was_training)
    return str(seen[0]).removeprefix("torch.")


def weights_format(model: nn.Module) -> str:
    """The memory format of the first convolution's weights, as the row ran them."""
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    channels_last = conv.weight.is_contiguous(memory_format=torch.channels_last)
    return "channels_last" if channels_last else "contiguous"


def lever_stage(config: Config, device: torch.device, lever: Lever, images: int) -> Stage:
    """The preset's stage with ``lever``'s memory format and BatchNorm precision applied to
    the trained model and its EMA copy (the model evaluation uses)."""
    stage = build_stage(random_run(config, device, images))
    models = [stage.model] + ([stage.ctx.ema.model] if stage.ctx.ema is not None else [])
    for model in models:
        if not lever.channels_last:
            # Parameters keep their identity (the optimizer's references stay valid).
            model.to(memory_format=torch.contiguous_format)
        if lever.bn_fp32:
            compute_bn_in_fp32(model, stage.ctx.autocast)
    return stage


def compiled(model: nn.Module, mode: str, smoke: bool) -> tuple[nn.Module, str]:
    """The training path's ``compile_model`` in ``mode`` (on a CPU smoke run: dynamo's
    ``eager`` backend, which traces without generating code), with dynamo's fallback to
    eager off, so a compiler failure fails the row instead of timing eager code."""
    import torch._dynamo

    torch._dynamo.reset()  # each row compiles from scratch: compile_s is the row's own
    if smoke:
        model, backend = torch.compile(model, backend="eager"), "eager"
    else:
        model, backend = compile_model(model, mode), "inductor"
    torch._dynamo.config.suppress_errors = False  # compile_model turns it on
    return model, backend


def compile_counts() -> dict[str, int]:
    from torch._dynamo.utils import counters

    return {
        "graphs": counters["stats"]["unique_graphs"],
        "graph_breaks": sum(counters["graph_break"].values()),
        "cudagraph_skips": counters["inductor"]["cudagraph_skips"],
    }


def measure(preset: str, lever_name: str, device: torch.device, args) -> dict:
    lever = LEVERS[lever_name]
    overrides: dict = {"train": {"batch_size": args.batch_size}} if args.batch_size else {}
    if args.smoke:  # bf16 autocast on the CPU too, so the BatchNorm rows differ as on CUDA
        overrides.setdefault("train", {})["precision"] = "bf16"
    config = layered_config(preset, overrides=overrides)
    batch = config.train.batch_size
    stage = lever_stage(config, device, lever, batch * args.steps)
    row = {
        "preset": preset,
        "lever": lever_name,
        "model": config.model.name,
        "size": input_size(config.model),
        "batch": batch,
        "steps": args.steps,
        "compile_mode": lever.compile_mode,
        "backend": None,
        "channels_last": lever.channels_last,
        "autocast": str(stage.ctx.autocast).removeprefix("torch.") if stage.ctx.autocast else None,
        "weights_format": weights_format(stage.model),
        "bn_computes_in": bn_input_dtype(
            stage.model, stage.ctx.autocast, input_size(config.model), device
        ),
        "sync_every": sync_interval(config.train.sync_every, device),
    }
    trained = stage.model
    if lever.compile_mode is not None:
        from torch._dynamo.utils import counters

        counters.clear()
        trained, row["backend"] = compiled(stage.model, lever.compile_mode, args.smoke)
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
            sync_every=row["sync_every"],
        )

    # Compiled: a second warm-up pass, where CUDA graphs are recorded after their first run.
    warmup = 2 if lever.compile_mode else 1
    first_s, train_s = timed_passes(epoch, device, args.repeats, warmup)
    flops = count_flops(build_model(config.model), input_size(config.model))
    rate = batch * args.steps / train_s
    row.update(
        train_img_s=rate,
        tflops=3 * flops * rate / 1e12,
        first_pass_s=first_s,
        compile_s=max(first_s - train_s, 0.0) if lever.compile_mode else None,
    )
    if lever.compile_mode is not None:
        row.update(compile_counts())
    row["eval_img_s"] = None if lever.compile_mode else eval_rate(stage, config, device, args)
    return row


def eval_rate(stage: Stage, config: Config, device: torch.device, args) -> float:
    """Evaluation images/s (``predict_logits`` under the training autocast); compiling does
    not touch evaluation, so only the eager rows measure it."""

    def evaluate():
        return predict_logits(
            eval_model(stage),
            stage.val_batches,
            config.train.eval_batch_size,
            autocast=stage.ctx.autocast,
        )

    _, seconds = timed_passes(evaluate, device, args.repeats)
    return len(stage.val_batches) / seconds


def device_line(device: torch.device) -> str:
    if device.type != "cuda":
        return f"cpu ({os.cpu_count()} cores), smoke run: not a measurement"
    props = torch.cuda.get_device_properties(device)
    return (
        f"{props.name}, {props.total_memory / 2**30:.0f} GiB, compute capability "
        f"{props.major}.{props.minor}, CUDA {torch.version.cuda}"
    )


def header(device: torch.device, peak: float, peak_name: str) -> dict:
    return {
        "command": shlex.join(["python", *sys.argv]),
        "date": f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        "device": device_line(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "peak_tflops": peak / 1e12,
        "peak": peak_name,
        "levers": {name: lever.decides for name, lever in LEVERS.items()},
        "rows": [],
    }


def print_header(report: dict) -> None:
    for key in ("command", "date", "device", "torch"):
        print(f"{key + ':':<8} {report[key]}")
    print(f"peak:    {report['peak_tflops']:.2f} TFLOP/s measured ({report['peak']})\n")
    print(
        f"{'preset':<26} {'lever':<20} {'px':>4} {'batch':>5} {'BN in':>8} | "
        f"{'train img/s':>11} {'TFLOP/s':>8} {'of peak':>7} {'compile s':>9} | "
        f"{'eval img/s':>10}"
    )


def print_row(row: dict, peak_tflops: float) -> None:
    lead = f"{row['preset']:<26} {row['lever']:<20}"
    if "train_img_s" not in row:
        print(f"{lead} {row.get('error') or row.get('skipped')}", flush=True)
        return
    compile_s = "" if row["compile_s"] is None else f"{row['compile_s']:.1f}"
    eval_rate = "" if row["eval_img_s"] is None else f"{row['eval_img_s']:,.0f}"
    print(
        f"{lead} {row['size']:>4} {row['batch']:>5} {row['bn_computes_in'] or '-':>8} | "
        f"{row['train_img_s']:>11,.0f} {row['tflops']:>8.2f} "
        f"{row['tflops'] / peak_tflops:>7.1%} {compile_s:>9} | {eval_rate:>10}",
        flush=True,
    )


def write_json(report: dict, path: Path | None) -> None:
    if path is None:
        return
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(report, indent=1) + "\n")
    partial.replace(path)  # never a half-written file, even if the run is killed


def one_row(preset: str, lever: str, device: torch.device, args, out_of_time: bool) -> dict:
    if out_of_time:
        return {"preset": preset, "lever": lever, "skipped": f"--budget-s {args.budget_s} spent"}
    try:
        return measure(preset, lever, device, args)
    except Exception as error:  # a compiler failure, out of memory: the next row still runs
        first_line = (str(error).strip().splitlines() or [""])[0][:300]
        return {"preset": preset, "lever": lever, "error": f"{type(error).__name__}: {first_line}"}
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=PRESETS, help="recipes to measure")
    parser.add_argument(
        "--levers", nargs="+", default=list(LEVERS), choices=list(LEVERS), help="rows per preset"
    )
    parser.add_argument("--steps", type=int, default=50, help="steps per timed pass")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes (median)")
    parser.add_argument("--batch-size", type=int, help="instead of each preset's")
    parser.add_argument("--json", type=Path, help="write the rows here (after each row)")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=math.inf,
        help="start no row after this many seconds (those left are listed as skipped)",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="no CUDA: run the same rows on the CPU at toy sizes (not a measurement)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()
    args = parse_args(argv)
    if torch.cuda.is_available():
        device, dtype, n, peak_name = torch.device("cuda"), torch.bfloat16, 8192, "bf16 mm"
        speed_up(device)
        args.smoke = False  # a GPU measures for real
    elif args.smoke:
        device, dtype, n, peak_name = torch.device("cpu"), torch.float32, 256, "fp32 mm, smoke"
        args.steps, args.repeats, args.batch_size = 2, 1, args.batch_size or 8
    else:
        print("CUDA is absent: nothing to measure here (--smoke runs the code on the CPU).")
        return 0
    report = header(device, matmul_peak(device, dtype, n, args.repeats), peak_name)
    print_header(report)
    write_json(report, args.json)
    for lever in args.levers:
        for preset in args.presets:
            out_of_time = time.monotonic() - started > args.budget_s
            row = one_row(preset, lever, device, args, out_of_time)
            if "train_img_s" in row:
                row["of_peak"] = row["tflops"] / report["peak_tflops"]
            report["rows"].append(row)
            print_row(row, report["peak_tflops"])
            write_json(report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
