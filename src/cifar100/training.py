"""``train()``: config in, run directory out. One readable epoch loop per stage.

A run is one or more *stages* (the CNNs have one; MobileNetV2 has a frozen stage and a
fine-tuning stage). Each stage checkpoints after every epoch, and on Ctrl-C or a timer
mid-epoch, so a killed run resumes at the exact step it reached with the same RNG state.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cifar100 import distributed, runlock, stopping
from cifar100.allocator import tune_allocator
from cifar100.batches import ImageBatches
from cifar100.checkpoint import load_checkpoint, rng_state, save_checkpoint
from cifar100.config import Config, ConfigError, to_dict
from cifar100.data import Cifar100, Splits, load_cifar100, make_splits
from cifar100.device import select_device
from cifar100.ema import ModelEma
from cifar100.engine import (
    EpochState,
    StepContext,
    TrainingInterrupted,
    evaluate,
    is_sync_step,
    train_one_epoch,
)
from cifar100.models import build_model, input_size, model_spec
from cifar100.optim import (
    load_optimizer_state,
    make_optimizer,
    make_scheduler,
    restore_scheduler,
)
from cifar100.preprocess import Preprocess
from cifar100.runs import (
    append_metrics,
    plot_curves,
    resume_run,
    start_run,
    truncate_metrics,
    write_json,
)
from cifar100.speed import compile_model, speed_up, sync_interval


@dataclass
class Run:
    """What every stage of a run shares."""

    config: Config
    run_dir: Path
    device: torch.device
    dataset: Cifar100
    splits: Splits
    preprocess: Preprocess
    elapsed: float = 0.0  # training seconds, summed over resumes
    resume: dict[str, Any] | None = None  # last.pt of an interrupted run
    on_epoch: Callable[[dict[str, Any]], None] | None = None  # gets each epoch's metrics row

    def metadata(self) -> dict[str, Any]:
        """What a checkpoint needs so that evaluate/predict/export work from it alone."""
        p = self.preprocess
        return {"config": to_dict(self.config), "model_name": self.config.model.name,
                "class_names": self.dataset.class_names,
                "superclass_names": self.dataset.superclass_names,
                "fine_to_coarse": self.dataset.fine_to_coarse().tolist(),
                "preprocess": {"size": p.size, "mean": p.mean.flatten().tolist(),
                               "std": p.std.flatten().tolist()}}


@dataclass
class Stage:
    name: str
    model: nn.Module
    epochs: int
    batch_size: int
    train_batches: Any  # ImageBatches or a feature cache with the same get()/labels
    val_batches: Any
    ctx: StepContext
    plateau: Any | None = None  # ReduceLROnPlateau, stepped on validation loss
    full_model: nn.Module | None = None  # saved in checkpoints when ``model`` is only a part
    best_top1: float = -1.0
    bad_epochs: int = 0
    epoch: int = 0


def epoch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The shuffle of one epoch depends only on (seed, epoch): no state to carry across."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def eval_model(stage: Stage) -> nn.Module:
    return stage.ctx.ema.model if stage.ctx.ema is not None else stage.model


def saved_model(stage: Stage, for_eval: bool = False) -> nn.Module:
    """The whole network, even when a stage trains only its head on cached features."""
    if stage.full_model is not None:
        return stage.full_model
    return eval_model(stage) if for_eval else stage.model


def checkpoint_state(run: Run, stage: Stage, epoch_state: EpochState | None, generator):
    progress = asdict(epoch_state) if epoch_state else None
    return {"stage": stage.name, "epoch": stage.epoch, "model": saved_model(stage).state_dict(),
            "optimizer": stage.ctx.optimizer.state_dict(),
            "scheduler": (stage.ctx.scheduler or stage.plateau).state_dict()
            if (stage.ctx.scheduler or stage.plateau) else None,
            "ema": stage.ctx.ema.model.state_dict() if stage.ctx.ema else None,
            "epoch_state": progress,
            "best_top1": stage.best_top1, "bad_epochs": stage.bad_epochs,
            "elapsed": run.elapsed, "rng": rng_state(generator),
            **distributed.gather_rank_states(rng_state(generator), progress), **run.metadata()}


def restore_stage(stage: Stage, state: dict[str, Any], generator) -> EpochState | None:
    saved_model(stage).load_state_dict(state["model"])
    load_optimizer_state(stage.ctx.optimizer, state["optimizer"])  # CUDA file on CPU, and back
    scheduler = stage.ctx.scheduler or stage.plateau
    if scheduler is not None and state["scheduler"] is not None:
        restore_scheduler(scheduler, state["scheduler"], stage.ctx.optimizer)
    if stage.ctx.ema is not None:
        stage.ctx.ema.model.load_state_dict(state["ema"])
    stage.epoch, stage.best_top1, stage.bad_epochs = (state["epoch"], state["best_top1"],
                                                      state["bad_epochs"])
    progress = distributed.restore_rank_state(state, generator)  # this rank's, under torchrun
    if progress is None:
        return None
    # Checkpoints written before issue 14 also carry an unused, always empty "extra".
    return EpochState(**{k: v for k, v in progress.items() if k != "extra"})


def run_stage(run: Run, stage: Stage) -> None:
    """The epoch loop: train, validate, keep the best (on validation), checkpoint, stop early.

    A stop signal is deferred to the end of the current step, which then saves ``last.pt``
    (see ``cifar100.stopping``): the run resumes at that exact step.
    """
    with stopping.deferred():
        _run_epochs(run, stage)


def _run_epochs(run: Run, stage: Stage) -> None:
    cfg, ckpt_dir = run.config.train, run.run_dir / "checkpoints"
    if len(stage.train_batches) < stage.batch_size:
        raise ConfigError(f"{stage.name}: {len(stage.train_batches)} training images are fewer "
                          f"than one batch of {stage.batch_size}; lower train.batch_size or "
                          "use a larger --train-subset")
    # Under torchrun every rank augments its own images: its own generator (seed + rank).
    generator = torch.Generator(device=run.device).manual_seed(cfg.seed + distributed.rank())
    model = distributed.wrap_model(stage.model, run.device, cfg.sync_bn)  # DDP, or itself
    if cfg.compile:
        model = compile_model(model)  # for training only; stage.model is saved and evaluated
    every, steps = sync_interval(cfg.sync_every, run.device), 0
    epoch_state = None
    if run.resume is not None and run.resume["stage"] == stage.name:
        epoch_state = restore_stage(stage, run.resume, generator)
        if distributed.is_main():
            truncate_metrics(run.run_dir, stage.epoch, stage.name)
        run.resume = None
    last_save, started = time.monotonic(), time.perf_counter()

    def on_pause(state: EpochState) -> bool:
        # Only at sync steps: there ``state`` is up to date, and every rank votes at the same
        # step without a collective at each one. A stop waits at most ``every`` steps.
        nonlocal last_save, started
        if not is_sync_step(state.step, steps, every):
            return False
        timed = time.monotonic() - last_save > cfg.checkpoint_minutes * 60
        stop, timed = distributed.agree(stopping.requested() is not None, timed)  # all ranks
        if stop or timed:
            run.elapsed += time.perf_counter() - started
            started = time.perf_counter()
            last = checkpoint_state(run, stage, state, generator)
            if distributed.is_main():
                save_checkpoint(last, ckpt_dir / "last.pt")
            distributed.barrier()  # no rank exits before last.pt is whole
            last_save, started = time.monotonic(), time.perf_counter()
        return stop

    while stage.epoch < stage.epochs and not _early_stop(stage, cfg.early_stopping):
        started = time.perf_counter()
        order = epoch_order(cfg.seed, stage.epoch, len(stage.train_batches))
        order, batch_size = distributed.shard_order(order, stage.batch_size)  # this rank's part
        steps = len(order) // batch_size
        desc = f"{stage.name} {stage.epoch + 1}/{stage.epochs}"
        state = epoch_state or EpochState()
        train = train_one_epoch(model, stage.train_batches, stage.ctx, batch_size, order,
                                generator, state, on_pause, desc, every)
        train = distributed.mean_metrics(train)
        epoch_state = None
        try:
            val = distributed.evaluate_sharded(evaluate, eval_model(stage), stage.val_batches,
                                               cfg.eval_batch_size, autocast=stage.ctx.autocast)
        except KeyboardInterrupt:
            # The epoch's training is done: keep it, and validate first thing on resume.
            run.elapsed += time.perf_counter() - started
            if distributed.is_main():
                save_checkpoint(checkpoint_state(run, stage, state, generator),
                                ckpt_dir / "last.pt")
            raise TrainingInterrupted(f"stopped while validating epoch {stage.epoch + 1}"
                                      ) from None
        run.elapsed += time.perf_counter() - started  # wall time: training and validation
        row = _end_epoch(run, stage, train, val, generator)
        if run.on_epoch is not None:
            run.on_epoch(row)  # may raise (a tuning trial pruned): last.pt is already saved


def _early_stop(stage: Stage, patience: int | None) -> bool:
    return patience is not None and stage.bad_epochs >= patience


def _end_epoch(run: Run, stage: Stage, train: dict, val: dict, generator) -> dict:
    if stage.plateau is not None:
        stage.plateau.step(val["loss"])
    stage.epoch += 1
    ckpt_dir = run.run_dir / "checkpoints"
    if val["top1"] > stage.best_top1:
        stage.best_top1, stage.bad_epochs = val["top1"], 0
        best = {"stage": stage.name, "epoch": stage.epoch, "val": val,
                "model": saved_model(stage, for_eval=True).state_dict(), **run.metadata()}
        if distributed.is_main():
            save_checkpoint(best, ckpt_dir / "best.pt")
    else:
        stage.bad_epochs += 1
    lr = stage.ctx.optimizer.param_groups[0]["lr"]
    row = {"stage": stage.name, "epoch": stage.epoch, "lr": lr, "elapsed_s": round(run.elapsed, 1),
           **{f"train_{k}": v for k, v in train.items()}, **{f"val_{k}": v for k, v in val.items()}}
    last = checkpoint_state(run, stage, None, generator)  # a collective under torchrun
    if distributed.is_main():  # the only rank that writes files (and prints)
        append_metrics(run.run_dir, row)
        save_checkpoint(last, ckpt_dir / "last.pt")
        plot_curves(run.run_dir)
        print(f"[{stage.name}] epoch {stage.epoch}/{stage.epochs}  train loss "
              f"{train['loss']:.3f} top1 {train['top1']:.3f} | val loss {val['loss']:.3f} top1 "
              f"{val['top1']:.3f} top5 {val['top5']:.3f} | lr {lr:.2e} | "
              f"{run.elapsed / 60:.1f} min", file=sys.stderr,
              flush=True)  # stderr: stdout stays clean for --json
    return row


def prepare_run(config: Config, run_dir: Path, resume: bool,
                command: list[str] | None = None) -> Run:
    cfg = config.train
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = distributed.init(select_device(cfg.device))  # under torchrun: cuda:LOCAL_RANK
    speed_up(device)  # CUDA only: cuDNN autotuning, TF32
    dataset = load_cifar100(config.data.data_dir)
    splits = make_splits(dataset, config.data.val_fraction, config.data.split_seed,
                         config.data.train_subset)
    spec = model_spec(config.model.name)
    preprocess = Preprocess(input_size(config.model), spec.mean, spec.std,
                            config.data.standardize).to(device)
    last = run_dir / "checkpoints" / "last.pt"
    # A run stopped before its first checkpoint (e.g. while extracting features) resumes
    # from the start, with its recorded config.
    state = load_checkpoint(last) if resume and last.exists() else None
    if distributed.is_main():
        (resume_run if resume else start_run)(run_dir, config, device, command)
    run = Run(config, run_dir, device, dataset, splits, preprocess, resume=state)
    if state is not None:
        run.elapsed = state["elapsed"]
    return run


def build_cnn_stage(run: Run) -> Stage:
    config, device = run.config, run.device
    torch.manual_seed(config.train.seed)  # initialisation
    model = build_model(config.model).to(device, memory_format=torch.channels_last)
    train_batches = ImageBatches(run.splits.train, run.preprocess, device, config.augment)
    val_batches = ImageBatches(run.splits.val, run.preprocess, device)
    steps = len(train_batches) // config.train.batch_size
    optimizer = make_optimizer(model.parameters(), config.optim)
    scheduler, per_step = make_scheduler(optimizer, config.optim, config.train.epochs, steps)
    ema = ModelEma(model, config.train.ema_decay) if config.train.ema_decay else None
    autocast = torch.bfloat16 if device.type == "cuda" else None
    ctx = StepContext(optimizer, scheduler if per_step else None, len(run.dataset.class_names),
                      config.optim.label_smoothing, config.augment, config.optim.grad_clip,
                      ema, autocast)
    return Stage("main", model, config.train.epochs, config.train.batch_size, train_batches,
                 val_batches, ctx, plateau=None if per_step else scheduler)


def final_results(run: Run, model: nn.Module, test_set: bool = True) -> dict[str, Any]:
    """Load the best checkpoint (chosen on validation) and measure it once on the test set.

    ``test_set=False`` (hyperparameter tuning) never touches the test split.
    """
    best = load_checkpoint(run.run_dir / "checkpoints" / "best.pt")
    model.load_state_dict(best["model"])
    cfg = run.config.train
    autocast = torch.bfloat16 if run.device.type == "cuda" else None
    if test_set:
        print(f"testing the best checkpoint ({best['stage']} epoch {best['epoch']}) on "
              f"{len(run.splits.test):,} test images", file=sys.stderr, flush=True)
    test = evaluate(model, ImageBatches(run.splits.test, run.preprocess, run.device),
                    cfg.eval_batch_size, cfg.tta_flip, autocast) if test_set else None
    results = {"model": run.config.model.name, "run_dir": str(run.run_dir),
               "best_stage": best["stage"], "best_epoch": best["epoch"],
               "val_top1": best["val"]["top1"], "val_top5": best["val"]["top5"],
               **({"test_top1": test["top1"], "test_top5": test["top5"],
                   "test_loss": test["loss"]} if test else {}),
               "tta_flip": cfg.tta_flip, "split_seed": run.config.data.split_seed,
               "train_minutes": round(run.elapsed / 60, 2),
               "parameters": sum(p.numel() for p in model.parameters()),
               "train_images": len(run.splits.train), "process": process_usage()}
    write_json(run.run_dir / "results.json", results)
    return results


def process_usage() -> dict[str, float]:
    """CPU seconds (user, kernel) and minor page faults of this process so far: system time
    far above a few percent of user time means memory churn (see cifar100.allocator)."""
    try:
        import resource  # Unix only
    except ImportError:
        return {}
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"user_s": round(usage.ru_utime, 1), "system_s": round(usage.ru_stime, 1),
            "minor_faults": usage.ru_minflt}


def train(config: Config, run_dir: str | Path, resume: bool = False,
          on_epoch: Callable[[dict[str, Any]], None] | None = None,
          test_set: bool = True, command: list[str] | None = None,
          overwrite: bool = False) -> dict[str, Any]:
    """Train as ``config`` says; return the final metrics (also in ``results.json``).

    ``on_epoch(row)`` sees each epoch's metrics row (what ``metrics.jsonl`` gets) and may
    raise to end the run, e.g. ``optuna.TrialPruned``. ``test_set=False`` skips the test
    evaluation. ``command`` is recorded in run.json (default: ``sys.argv``). Under torchrun
    every rank returns rank 0's results.

    A ``run_dir`` that holds a run is continued with ``resume=True`` or replaced with
    ``overwrite=True``, and refused otherwise; a run another process is writing (its
    lock is held) is never touched (see ``cifar100.runlock``).
    """
    run_dir = Path(run_dir)
    if os.environ.get("RANK", "0") != "0":  # under torchrun rank 0 alone owns the folder
        return _train(config, run_dir, resume, on_epoch, test_set, command)
    with runlock.locked(run_dir):
        if resume:
            runlock.claim_resume(run_dir)
        else:
            runlock.claim_fresh(run_dir, overwrite)
        return _train(config, run_dir, resume, on_epoch, test_set, command)


def _train(config: Config, run_dir: Path, resume: bool, on_epoch, test_set: bool,
           command: list[str] | None) -> dict[str, Any]:
    tune_allocator()  # the CLI already did; Python API users get the same speed
    run = prepare_run(config, run_dir, resume, command)
    run.on_epoch = on_epoch
    try:
        model = _train_stages(run)
    except TrainingInterrupted as stop:
        raise TrainingInterrupted(f"{stop.detail}; state saved, resume with: cifar100 train "
                                  f"--resume {run_dir}") from None
    except KeyboardInterrupt as stop:  # between stages: e.g. extracting features
        detail = getattr(stop, "detail", "stopped before training")
        raise stopping.interrupted(stop, f"{detail}; resume with: cifar100 train --resume "
                                   f"{run_dir}") from None
    try:
        results = final_results(run, model, test_set) if distributed.is_main() else None
    except KeyboardInterrupt as stop:
        raise stopping.interrupted(stop, "stopped during the test-set evaluation; training "
                                   f"is finished and saved: cifar100 train --resume {run_dir} "
                                   "evaluates it") from None
    return distributed.share(results)


def _train_stages(run: Run) -> nn.Module:
    if model_spec(run.config.model.name).pretrained:
        from cifar100.transfer import run_transfer

        return run_transfer(run)
    stage = build_cnn_stage(run)
    run_stage(run, stage)
    return eval_model(stage)
