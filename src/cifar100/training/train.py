"""``train()``: config in, run directory out.

It composes the pieces: prepare the run (device, data, run directory), ask the model's
registry entry for its stage plan (``cifar100.training.plans``), let the loop train those stages
(``cifar100.training.loop``), then test the best checkpoint once and write ``results.json``.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cifar100.config.schema import Config, flat_settings
from cifar100.data.batches import ImageBatches, capped_batch
from cifar100.data.cifar import load_cifar100, make_splits
from cifar100.data.preprocess import Preprocess
from cifar100.evaluation.inference import score, tta_views
from cifar100.models import input_size, model_spec
from cifar100.runs import lock, tensorboard, tracking
from cifar100.runs.folders import (
    new_run_dir,
    read_json,
    read_metrics,
    resume_run,
    start_run,
    time_to_val,
    write_json,
)
from cifar100.runtime import distributed, stopping
from cifar100.runtime.allocator import tune_allocator
from cifar100.runtime.checkpoint import load_checkpoint
from cifar100.runtime.device import select_device
from cifar100.runtime.speed import inference_runner, speed_up, warn_emulated_bf16
from cifar100.training.engine import TrainingInterrupted
from cifar100.training.loop import Run, run_stages
from cifar100.training.plans import stage_plan


def prepare_run(
    config: Config,
    run_dir: Path,
    resume: bool,
    command: list[str] | None = None,
    started: float | None = None,
) -> Run:
    """The ``Run`` every stage shares: device, data, splits, preprocessing, run directory,
    and the interrupted run's ``last.pt`` when resuming. ``started``: the command's
    ``time.perf_counter()`` at its start, where its wall time is counted from."""
    started = time.perf_counter() if started is None else started
    cfg = config.train
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = distributed.init(select_device(cfg.device))  # under torchrun: cuda:LOCAL_RANK
    speed_up(device)  # CUDA only: cuDNN autotuning, TF32
    warn_emulated_bf16(cfg.precision, device)
    dataset = load_cifar100(config.data.data_dir)
    splits = make_splits(
        dataset,
        config.data.val_fraction,
        config.data.split_seed,
        config.data.train_subset,
        cfg.refit,
    )
    spec = model_spec(config.model.name)
    preprocess = Preprocess(
        input_size(config.model), spec.mean, spec.std, config.data.standardize
    ).to(device)
    last = run_dir / "checkpoints" / "last.pt"
    # A run stopped before its first checkpoint (e.g. while extracting features) resumes
    # from the start, with its recorded config.
    state = load_checkpoint(last) if resume and last.exists() else None
    if distributed.is_main():
        (resume_run if resume else start_run)(
            run_dir, config, device, command, distributed.launch()
        )
    run = Run(
        config, run_dir, device, dataset, splits, preprocess, resume=state, wall_started=started
    )
    if state is not None:
        run.elapsed = state["elapsed"]
        run.wall_before = state.get("wall_seconds")  # None in checkpoints from before it
    return run


def new_shared_run_dir(config: Config, root: str | Path = "runs") -> Path:
    """A new run folder under ``root``, the same on every rank under torchrun.

    Rank 0 picks it and broadcasts it: were every rank to pick its own, a later rank would
    find rank 0's folder taken (or the clock a second on) and train into another, and a
    transfer run would then look for stage 1's ``best.pt`` where nothing saved it.
    """
    if distributed.env_world_size() <= 1:
        return new_run_dir(root, config.model.name)
    distributed.init(select_device(config.train.device))  # joins the group (kept after)
    chosen = new_run_dir(root, config.model.name) if distributed.is_main() else None
    return Path(distributed.share(chosen))


def final_results(run: Run, model: nn.Module, test_set: bool = True) -> dict[str, Any]:
    """Load the best checkpoint (chosen on validation; a refit's last) and measure it once
    on the test set.

    ``test_set=False`` (hyperparameter tuning) never touches the test split.
    """
    best = load_checkpoint(run.run_dir / "checkpoints" / "best.pt")
    model.load_state_dict(best["model"])
    cfg = run.config.train
    if test_set:
        print(
            f"testing the best checkpoint ({best['stage']} epoch {best['epoch']}) on "
            f"{len(run.splits.test):,} test images",
            file=sys.stderr,
            flush=True,
        )
    size, views = run.preprocess.size, len(tta_views(cfg.tta_flip, cfg.tta_translate))
    batch = capped_batch(cfg.eval_batch_size, size)
    tester = inference_runner(model, run.device, len(run.splits.test) * views, size, batch)
    test = (
        score(
            tester,
            ImageBatches(run.splits.test, run.preprocess, run.device),
            batch,
            cfg.tta_flip,
            run.autocast,  # as validation measured it, and as `cifar100 evaluate` does
            cfg.tta_translate,
        )
        if test_set
        else None
    )
    results = {
        "model": run.config.model.name,
        "run_dir": str(run.run_dir),
        "best_stage": best["stage"],
        "best_epoch": best["epoch"],
        "val_top1": best["val"]["top1"] if best["val"] else None,  # None: a refit
        "val_top5": best["val"]["top5"] if best["val"] else None,
        "refit": cfg.refit,
        **(
            {"test_top1": test["top1"], "test_top5": test["top5"], "test_loss": test["loss"]}
            if test
            else {}
        ),
        "tta_flip": cfg.tta_flip,
        "tta_translate": cfg.tta_translate,
        "split_seed": run.config.data.split_seed,
        **training_time(run),
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_images": len(run.splits.train),
        "process": process_usage(),
    }
    if run.config.distill.teachers:  # which teachers, their checkpoints and their cost
        results["distill"] = read_json(run.run_dir / "run.json").get("distill")
    wall = run.wall_seconds()  # the last test-set figure is in: the command's time is known
    if wall is not None:  # unknown when resumed from a checkpoint that did not keep it
        results["wall_seconds"] = round(wall, 1)
    write_json(run.run_dir / "results.json", results)
    settings = flat_settings(run.config)
    tensorboard.log_results(run.run_dir, results, settings)
    if run.config.track.mlflow:
        tracking.log_run_or_warn(run.run_dir, run.config.track.mlflow, results, settings)
    return results


def training_time(run: Run) -> dict[str, Any]:
    """Training seconds (every stage's loop whole: checkpoints, validation and figures
    included; summed over resumes), the same in minutes for older readers, and when
    validation top-1 first reached each 5-point step (``time_to_val``)."""
    seconds = round(run.elapsed, 1)
    return {
        "train_seconds": seconds,
        "train_minutes": round(seconds / 60, 2),
        "time_to_val": time_to_val(read_metrics(run.run_dir)),
    }


def process_usage() -> dict[str, float]:
    """CPU seconds (user, kernel) and minor page faults of this process so far: system time
    far above a few percent of user time means memory churn (see cifar100.runtime.allocator)."""
    try:
        import resource  # Unix only
    except ImportError:
        return {}
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "user_s": round(usage.ru_utime, 1),
        "system_s": round(usage.ru_stime, 1),
        "minor_faults": usage.ru_minflt,
    }


def train(
    config: Config,
    run_dir: str | Path,
    resume: bool = False,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    test_set: bool = True,
    command: list[str] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Train as ``config`` says; return the final metrics (also in ``results.json``).

    ``on_epoch(row)`` sees each epoch's metrics row (what ``metrics.jsonl`` gets) and may
    raise to end the run, e.g. ``optuna.TrialPruned``. ``test_set=False`` skips the test
    evaluation. ``command`` is recorded in run.json (default: ``sys.argv``). Under torchrun
    every rank returns rank 0's results.

    A ``run_dir`` that holds a run is continued with ``resume=True`` or replaced with
    ``overwrite=True``, and refused otherwise; a run another process is writing (its
    lock is held) is never touched (see ``cifar100.runs.lock``).
    """
    started = time.perf_counter()  # the command's wall time counts from here
    tracking.require_mlflow(config.track.mlflow)  # before the folder is touched
    run_dir = Path(run_dir)
    if os.environ.get("RANK", "0") != "0":  # under torchrun rank 0 alone owns the folder
        return _train(config, run_dir, resume, on_epoch, test_set, command, started)
    with lock.locked(run_dir):
        if resume:
            lock.claim_resume(run_dir)
        else:
            lock.claim_fresh(run_dir, overwrite)
        return _train(config, run_dir, resume, on_epoch, test_set, command, started)


def _train(
    config: Config,
    run_dir: Path,
    resume: bool,
    on_epoch,
    test_set: bool,
    command: list[str] | None,
    started: float,
) -> dict[str, Any]:
    tune_allocator()  # the CLI already did; Python API users get the same speed
    run = prepare_run(config, run_dir, resume, command, started)
    run.on_epoch = on_epoch
    try:
        model = _train_stages(run)
    except TrainingInterrupted as stop:
        raise TrainingInterrupted(
            f"{stop.detail}; state saved, resume with: cifar100 train --resume {run_dir}"
        ) from None
    except KeyboardInterrupt as stop:  # between stages: e.g. extracting features
        detail = getattr(stop, "detail", "stopped before training")
        raise stopping.interrupted(
            stop, f"{detail}; resume with: cifar100 train --resume {run_dir}"
        ) from None
    try:
        results = final_results(run, model, test_set) if distributed.is_main() else None
    except KeyboardInterrupt as stop:
        raise stopping.interrupted(
            stop,
            "stopped during the test-set evaluation; training "
            f"is finished and saved: cifar100 train --resume {run_dir} "
            "evaluates it",
        ) from None
    return distributed.share(results)


def _train_stages(run: Run) -> nn.Module:
    """The stages the model's plan names, trained in turn; the network to test."""
    plan = stage_plan(model_spec(run.config.model.name).plan)
    return run_stages(run, plan(run))
