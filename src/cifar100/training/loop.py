"""The loop: a run's stages, each one readable epoch loop with checkpoints and resume.

A run is one or more *stages*; which ones is the model's business (``cifar100.training.plans``),
not the loop's: it trains whatever ``Stage`` it is handed and knows no model.

Bookkeeping goes by the clock, not by the epoch: on a fast device an epoch takes a second,
and writing ``last.pt`` (fsync), ``best.pt`` and redrawing ``curves.png`` after each cost as
much as the training. A stage writes ``last.pt`` when ``train.checkpoint_minutes`` have
passed (at the next epoch end or sync step), at its end and on a stop signal, so a killed
run resumes at the exact step of its last save with the same RNG state and loses at most
that interval. The best weights wait in memory (a CPU copy) and are written to ``best.pt``
with every ``last.pt``; the curves are drawn at most once a minute and at each stage end.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cifar100.config.schema import Config, ConfigError, to_dict
from cifar100.data.batches import Batches
from cifar100.data.cifar import Cifar100, Splits
from cifar100.data.preprocess import Preprocess
from cifar100.evaluation.inference import score
from cifar100.runs import tensorboard
from cifar100.runs.folders import append_metrics, plot_curves, truncate_metrics
from cifar100.runtime import distributed, stopping
from cifar100.runtime.checkpoint import rng_state, save_checkpoint
from cifar100.runtime.speed import autocast_dtype, compile_model, sync_interval
from cifar100.training.engine import (
    EpochState,
    StepContext,
    TrainingInterrupted,
    epoch_context,
    is_sync_step,
    train_one_epoch,
)
from cifar100.training.optim import load_optimizer_state, restore_scheduler


@dataclass
class Run:
    """What every stage of a run shares."""

    config: Config
    run_dir: Path
    device: torch.device
    dataset: Cifar100
    splits: Splits
    preprocess: Preprocess
    # Training seconds, summed over resumes: the stages' loops whole (their checkpoints,
    # validation and figures included), plus feature extraction and teacher logits.
    elapsed: float = 0.0
    resume: dict[str, Any] | None = None  # last.pt of an interrupted run
    on_epoch: Callable[[dict[str, Any]], None] | None = None  # gets each epoch's metrics row
    # The whole command's wall time: this command's from when train() began, plus what
    # the commands before a resume had spent up to their last save (kept in last.pt; the
    # time between that save and a kill is redone, and counted, by the resume). None: a
    # checkpoint from before wall time was kept, so the total is unknown.
    wall_before: float | None = 0.0
    wall_started: float = field(default_factory=time.perf_counter)
    _lap_started: float | None = None  # perf_counter when the running stretch of training began

    def lap(self) -> float:
        """Fold the stretch of training running now (if any) into ``elapsed``; return it."""
        now = time.perf_counter()
        if self._lap_started is not None:
            self.elapsed += now - self._lap_started
            self._lap_started = now
        return self.elapsed

    def start_clock(self) -> None:
        self._lap_started = time.perf_counter()

    def stop_clock(self) -> None:
        self.lap()
        self._lap_started = None

    def wall_seconds(self) -> float | None:
        """The command's wall seconds so far, earlier commands of a resumed run included."""
        if self.wall_before is None:
            return None
        return self.wall_before + time.perf_counter() - self.wall_started

    @property
    def autocast(self) -> torch.dtype | None:
        """What training and validation steps autocast to (``train.precision``)."""
        return autocast_dtype(self.config.train.precision, self.device)

    def metadata(self) -> dict[str, Any]:
        """What a checkpoint needs so that evaluate/predict/export work from it alone."""
        p = self.preprocess
        return {
            "config": to_dict(self.config),
            "model_name": self.config.model.name,
            "class_names": self.dataset.class_names,
            "superclass_names": self.dataset.superclass_names,
            "fine_to_coarse": self.dataset.fine_to_coarse().tolist(),
            "preprocess": {
                "size": p.size,
                "mean": p.mean.flatten().tolist(),
                "std": p.std.flatten().tolist(),
            },
        }


@dataclass
class Stage:
    """One phase of training: a model (or part of one), its batches, optimizer, length."""

    name: str  # recorded in metrics.jsonl and checkpoints; a resume finds its stage by it
    model: nn.Module
    epochs: int
    batch_size: int
    train_batches: Batches
    val_batches: Batches | None  # None: a refit (train.refit), which validates nothing
    ctx: StepContext
    plateau: Any | None = None  # ReduceLROnPlateau, stepped on validation loss
    full_model: nn.Module | None = None  # saved in checkpoints when ``model`` is only a part
    best_top1: float = -1.0
    bad_epochs: int = 0
    epoch: int = 0
    # The best model not yet written to best.pt (rank 0 only): its weights on the CPU.
    best: dict[str, Any] | None = None


PLOT_EVERY_S = 60.0  # curves.png is redrawn at most this often (matplotlib takes ~0.1-0.5 s)


@dataclass
class Bookkeeping:
    """When a stage last wrote ``last.pt`` and drew the curves, and what waits to be."""

    save_every_s: float
    saved_at: float = field(default_factory=time.monotonic)
    plotted_at: float = field(default_factory=time.monotonic)
    unsaved: bool = False  # trained since last.pt was written
    unplotted: bool = False  # metrics.jsonl has rows that curves.png does not show

    def save_due(self) -> bool:
        return time.monotonic() - self.saved_at >= self.save_every_s

    def plot_due(self) -> bool:
        return self.unplotted and time.monotonic() - self.plotted_at >= PLOT_EVERY_S


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


def run_stages(run: Run, stages: Iterable[Stage]) -> nn.Module:
    """Train each stage in turn; return the network the last one evaluates (to test).

    ``stages`` is usually a model's plan (a generator): it builds its next stage only after
    the loop has trained the previous one, e.g. to fine-tune from the best head.
    """
    last = None
    for stage in stages:
        run_stage(run, stage)
        last = stage
    if last is None:
        raise ConfigError(f"{run.config.model.name}: its plan has no stage to train")
    return saved_model(last, for_eval=True)


def run_stage(run: Run, stage: Stage) -> None:
    """The epoch loop: train, validate, keep the best (on validation), checkpoint, stop early.

    A stop signal is deferred to the end of the current step, which then saves ``last.pt``
    (see ``cifar100.runtime.stopping``): the run resumes at that exact step.
    """
    with stopping.deferred():
        _run_epochs(run, stage)


def checkpoint_state(run: Run, stage: Stage, epoch_state: EpochState | None, generator):
    progress = asdict(epoch_state) if epoch_state else None
    return {
        "stage": stage.name,
        "epoch": stage.epoch,
        "model": saved_model(stage).state_dict(),
        "optimizer": stage.ctx.optimizer.state_dict(),
        "scheduler": (stage.ctx.scheduler or stage.plateau).state_dict()
        if (stage.ctx.scheduler or stage.plateau)
        else None,
        "ema": stage.ctx.ema.model.state_dict() if stage.ctx.ema else None,
        "ema_updates": stage.ctx.ema.updates if stage.ctx.ema else None,
        "epoch_state": progress,
        "best_top1": stage.best_top1,
        "bad_epochs": stage.bad_epochs,
        "elapsed": run.lap(),
        "wall_seconds": run.wall_seconds(),
        "rng": rng_state(generator),
        **distributed.gather_rank_states(rng_state(generator), progress),
        **run.metadata(),
    }


def restore_stage(stage: Stage, state: dict[str, Any], generator) -> EpochState | None:
    saved_model(stage).load_state_dict(state["model"])
    load_optimizer_state(stage.ctx.optimizer, state["optimizer"])  # CUDA file on CPU, and back
    scheduler = stage.ctx.scheduler or stage.plateau
    if scheduler is not None and state["scheduler"] is not None:
        restore_scheduler(scheduler, state["scheduler"], stage.ctx.optimizer)
    if stage.ctx.ema is not None:
        stage.ctx.ema.model.load_state_dict(state["ema"])
        # Checkpoints from before the EMA warm-up have no count: they never used one.
        stage.ctx.ema.updates = state.get("ema_updates") or 0
    stage.epoch, stage.best_top1, stage.bad_epochs = (
        state["epoch"],
        state["best_top1"],
        state["bad_epochs"],
    )
    progress = distributed.restore_rank_state(state, generator)  # this rank's, under torchrun
    if progress is None:
        return None
    # Checkpoints written before issue 14 also carry an unused, always empty "extra".
    return EpochState(**{k: v for k, v in progress.items() if k != "extra"})


def _resume(run: Run, stage: Stage, generator) -> EpochState | None:
    """Restore ``stage`` if the interrupted run stopped in it; where its epoch stood."""
    if run.resume is None or run.resume["stage"] != stage.name:
        return None
    epoch_state = restore_stage(stage, run.resume, generator)
    if distributed.is_main():
        truncate_metrics(run.run_dir, stage.epoch, stage.name)
    run.resume = None
    return epoch_state


def _run_epochs(run: Run, stage: Stage) -> None:
    cfg = run.config.train
    if len(stage.train_batches) < stage.batch_size:
        raise ConfigError(
            f"{stage.name}: {len(stage.train_batches)} training images are fewer "
            f"than one batch of {stage.batch_size}; lower train.batch_size or "
            "use a larger --train-subset"
        )
    run.start_clock()  # everything from here to the stage's last file counts as training
    try:
        _train_epochs(run, stage, Bookkeeping(cfg.checkpoint_minutes * 60))
    finally:
        run.stop_clock()


def _train_epochs(run: Run, stage: Stage, books: Bookkeeping) -> None:
    cfg = run.config.train
    # Under torchrun every rank augments its own images: its own generator (seed + rank).
    generator = torch.Generator(device=run.device).manual_seed(cfg.seed + distributed.rank())
    model = distributed.wrap_model(stage.model, run.device, cfg.sync_bn)  # DDP, or itself
    if cfg.compile:
        model = compile_model(model, cfg.compile_mode)  # training only; stage.model is saved
    every, steps = sync_interval(cfg.sync_every, run.device), 0
    epoch_state = _resume(run, stage, generator)

    def on_pause(state: EpochState) -> bool:
        # Only at sync steps: there ``state`` is up to date, and every rank votes at the same
        # step without a collective at each one. A stop waits at most ``every`` steps.
        if not is_sync_step(state.step, steps, every):
            return False
        books.unsaved = True
        stop, timed = distributed.agree(stopping.requested() is not None, books.save_due())
        if stop or timed:
            _save(run, stage, state, generator, books)
        return stop

    try:
        while stage.epoch < stage.epochs and not _early_stop(stage, cfg.early_stopping):
            order = epoch_order(cfg.seed, stage.epoch, len(stage.train_batches))
            order, batch_size = distributed.shard_order(order, stage.batch_size)  # this rank's
            steps = len(order) // batch_size
            desc = f"{stage.name} {stage.epoch + 1}/{stage.epochs}"
            state = epoch_state or EpochState()
            ctx = epoch_context(stage.ctx, stage.epoch, stage.epochs)
            train = train_one_epoch(
                model,
                stage.train_batches,
                ctx,
                batch_size=batch_size,
                order=order,
                generator=generator,
                state=state,
                on_pause=on_pause,
                desc=desc,
                sync_every=every,
            )
            train = distributed.mean_metrics(train)
            if ctx.input_size is not None:
                train["input_size"] = ctx.input_size  # progressive resizing: in metrics.jsonl
            epoch_state = None
            books.unsaved = True
            val = _validate(run, stage, state, generator, books)
            row = _end_epoch(run, stage, train, val, generator, books)
            if run.on_epoch is not None:
                try:
                    run.on_epoch(row)  # may raise (a tuning trial pruned)
                except Exception:
                    _finish(run, stage, generator, books)  # the folder stays a resumable run
                    raise
        _finish(run, stage, generator, books)
    except TrainingInterrupted:
        _plot(run, books)  # last.pt is saved: the curves show what it holds
        raise


def _save(run: Run, stage: Stage, epoch_state: EpochState | None, generator, books) -> None:
    """Write ``best.pt`` (if a better model waits in memory), then ``last.pt``.

    A collective under torchrun (``checkpoint_state`` gathers every rank's RNG state): all
    ranks call it at the same point; rank 0 writes, and no rank goes on before the files
    are whole. ``best.pt`` goes first: a kill between the two leaves it ahead of ``last.pt``
    (the resume replays to the same best), never behind it.
    """
    last = checkpoint_state(run, stage, epoch_state, generator)
    if distributed.is_main():
        ckpt_dir = run.run_dir / "checkpoints"
        if stage.best is not None:
            save_checkpoint({**stage.best, **run.metadata()}, ckpt_dir / "best.pt")
            stage.best = None
        save_checkpoint(last, ckpt_dir / "last.pt")
    distributed.barrier()
    books.saved_at, books.unsaved = time.monotonic(), False


def _finish(run: Run, stage: Stage, generator, books: Bookkeeping) -> None:
    """The stage's end (or a run ended by ``on_epoch``): every file up to date."""
    if books.unsaved:  # nothing new when a resumed run's stage was already done
        _save(run, stage, None, generator, books)
    _plot(run, books)


def _plot(run: Run, books: Bookkeeping) -> None:
    """Redraw curves.png (rank 0) if metrics.jsonl has rows it does not show yet."""
    if distributed.is_main() and books.unplotted:
        plot_curves(run.run_dir)
        books.plotted_at, books.unplotted = time.monotonic(), False


def _validate(
    run: Run, stage: Stage, state: EpochState, generator, books: Bookkeeping
) -> dict | None:
    if stage.val_batches is None:
        return None  # a refit: every training image is trained on, none validates
    try:
        return distributed.evaluate_sharded(
            score,
            eval_model(stage),
            stage.val_batches,
            run.config.train.eval_batch_size,
            autocast=stage.ctx.autocast,
        )
    except KeyboardInterrupt:
        # The epoch's training is done: keep it, and validate first thing on resume. Every
        # rank is here (evaluate_sharded raises on all when one stops): checkpoint_state
        # gathers each rank's state, a collective that all of them must join.
        _save(run, stage, state, generator, books)
        raise TrainingInterrupted(f"stopped while validating epoch {stage.epoch + 1}") from None


def _early_stop(stage: Stage, patience: int | None) -> bool:
    return patience is not None and stage.bad_epochs >= patience


def _keep_best(run: Run, stage: Stage, val: dict | None) -> None:
    """Track the best epoch; rank 0 keeps its weights on the CPU until ``_save`` writes them."""
    # Without validation (a refit) nothing can choose an epoch: the best is the last.
    if val is not None and val["top1"] <= stage.best_top1:
        stage.bad_epochs += 1
        return
    stage.best_top1, stage.bad_epochs = (val["top1"] if val else -1.0), 0
    if distributed.is_main():
        weights = saved_model(stage, for_eval=True).state_dict()
        stage.best = {
            "stage": stage.name,
            "epoch": stage.epoch,
            "val": val,
            "model": {k: v.detach().to("cpu", copy=True) for k, v in weights.items()},
        }


def _end_epoch(run: Run, stage: Stage, train: dict, val: dict | None, generator, books) -> dict:
    if stage.plateau is not None:
        stage.plateau.step(val["loss"])  # a refit with a plateau schedule is refused before
    stage.epoch += 1
    _keep_best(run, stage, val)
    lr = stage.ctx.optimizer.param_groups[0]["lr"]
    row = {
        "stage": stage.name,
        "epoch": stage.epoch,
        "lr": lr,
        "elapsed_s": round(run.lap(), 1),
        **{f"train_{k}": v for k, v in train.items()},
        **{f"val_{k}": v for k, v in (val or {}).items()},
    }
    if distributed.is_main():  # the only rank that writes files (and prints)
        append_metrics(run.run_dir, row)  # a line: rows past last.pt go on resume
        tensorboard.log_epoch(run.run_dir)  # the same row, for `tensorboard --logdir runs`
        books.unplotted = True
        _print_epoch(run, stage, train, val, lr)
    (due,) = distributed.agree(books.save_due())  # the ranks' clocks differ: one decision
    if due:
        _save(run, stage, None, generator, books)
    if books.plot_due():
        _plot(run, books)
    return row


def _print_epoch(run: Run, stage: Stage, train: dict, val: dict | None, lr: float) -> None:
    validated = (
        f"val loss {val['loss']:.3f} top1 {val['top1']:.3f} top5 {val['top5']:.3f}"
        if val
        else "refit: no validation"
    )
    print(
        f"[{stage.name}] epoch {stage.epoch}/{stage.epochs}  train loss "
        f"{train['loss']:.3f} top1 {train['top1']:.3f} | {validated} | lr {lr:.2e} | "
        f"{run.elapsed / 60:.1f} min",
        file=sys.stderr,
        flush=True,
    )  # stderr: stdout stays clean for --json
