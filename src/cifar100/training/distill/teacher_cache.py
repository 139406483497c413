"""Cached teacher logits (``distill.mode: cached``): each training image in ``views``
augmented views, run through each teacher once, reused by every later run.

With per-batch augmentation a teacher must see the image the student sees: its logits
for the plain image are the wrong targets for a shifted crop. So the views are drawn once
from the run's augment settings (flip, translate, rotation, zoom, contrast), the teachers'
logits for them are stored, and every step shows each image in one of its views, picked
by the loop's generator (a resumed run picks the same). MixUp and CutMix still happen per
step; the cached targets are mixed as the labels are. Flips alternate over the views
(odd views are mirrored), so every image is seen both ways; with flipping alone and two
views, these are the image and its mirror.

One file per teacher under ``$CIFAR100_CACHE/teacher-logits/``, named by a hash of its
key: the teacher checkpoint's sha256, the data (a hash of the training images), the view
policy, the number of views and their seed; any change is another file, and a file whose
stored key differs (or that cannot be read) is computed again. Rows cover the whole
training set, with a mask of those computed: a run computes its own training images only
(never a validation or test image), and a run on a larger subset or another split
computes what is missing. Saved atomically, every few minutes and on Ctrl-C.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
from dataclasses import KW_ONLY, dataclass
from pathlib import Path
from typing import Any

import torch

from cifar100.config.schema import AugmentConfig
from cifar100.data.augment import AugmentParams, apply_augment, draw_augment, to_float
from cifar100.data.batches import ImageBatches
from cifar100.data.cifar import default_cache_dir
from cifar100.runtime import distributed
from cifar100.runtime.checkpoint import save_checkpoint
from cifar100.runtime.stopping import interrupted
from cifar100.training.distill.loss import Distiller
from cifar100.training.distill.teachers import Teacher, TeacherRunner
from cifar100.training.features import COMPILE_MIN_IMAGES, IncompleteCacheError, Progress
from cifar100.training.loop import Run

VERSION = 1  # of the file's layout and of the way views are drawn
EXTRACT_BATCH = 250
MIX_KEYS = ("mixup_alpha", "cutmix_alpha", "mix_off_epochs")  # per step, not per view


def view_policy(augment: AugmentConfig) -> AugmentConfig:
    """What a view is drawn from: the per-image augmentations (MixUp/CutMix stay per step)."""
    return dataclasses.replace(augment, mixup_alpha=0.0, cutmix_alpha=0.0)


def view_draws(augment: AugmentConfig, views: int, seed: int, n: int) -> AugmentParams:
    """(views, n) draws: view v of image i is the same augmentation in every run."""
    policy, per_view = view_policy(augment), []
    for v in range(views):
        draws = draw_augment(n, policy, torch.Generator().manual_seed(seed * 1_000_003 + v))
        if policy.flip:
            draws = dataclasses.replace(draws, flip=torch.full((n,), v % 2 == 1))
        per_view.append(draws)
    stacked = {
        f.name: None
        if getattr(per_view[0], f.name) is None
        else torch.stack([getattr(d, f.name) for d in per_view])
        for f in dataclasses.fields(AugmentParams)
    }
    return AugmentParams(**stacked)


def cache_key(
    teacher_sha256: str,
    images: torch.Tensor,
    augment: AugmentConfig,
    views: int,
    seed: int,
    autocast: torch.dtype | None = None,
) -> dict[str, Any]:
    """Everything the stored logits depend on (the split is not: rows are per image)."""
    policy = dataclasses.asdict(view_policy(augment))
    return {
        "version": VERSION,
        "teacher_sha256": teacher_sha256,
        "data": hashlib.sha1(images.cpu().numpy()).hexdigest()[:16],  # ~0.2 s for 50,000
        "policy": {k: v for k, v in policy.items() if k not in MIX_KEYS},
        "views": views,
        "view_seed": seed,
        "precision": "fp32" if autocast is None else str(autocast).removeprefix("torch."),
    }


def cache_path(key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    name = f"{key['teacher_sha256'][:12]}-{digest}.pt"
    return default_cache_dir() / "teacher-logits" / name


@dataclass
class LogitCache:
    path: Path
    key: dict[str, Any]
    logits: torch.Tensor  # (views, N, classes) float16: half the file, targets unchanged
    done: torch.Tensor  # (views, N) bool
    # Seconds spent computing what is stored, by every run that filled it: a later run that
    # reads the file pays nothing, so its record reports this one-off cost instead. None for
    # files written before the cost was kept (unknown).
    seconds: float | None = 0.0

    def missing(self, view: int, rows: torch.Tensor) -> torch.Tensor:
        return rows[~self.done[view][rows]]

    def save(self) -> None:
        state = {"key": self.key, "logits": self.logits, "done": self.done, "seconds": self.seconds}
        save_checkpoint(state, self.path)


def open_logits(key: dict[str, Any], rows: int, classes: int) -> LogitCache:
    """The cache for ``key``, or an empty one; a damaged or foreign file is not trusted."""
    path, shape = cache_path(key), (key["views"], rows, classes)
    if path.is_file():
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            if state["key"] == key and tuple(state["logits"].shape) == shape:
                seconds = state.get("seconds")
                return LogitCache(path, key, state["logits"], state["done"], seconds)
            why = "made for other settings"
        except Exception as error:  # noqa: BLE001  (a cache: any damage means recompute)
            why = f"unreadable ({type(error).__name__})"
        print(f"warning: {path}: {why}; computing the teacher's logits again", file=sys.stderr)
    return LogitCache(
        path, key, torch.zeros(shape, dtype=torch.float16), torch.zeros(shape[:2], dtype=torch.bool)
    )


def require_logits(cache: LogitCache, rows: torch.Tensor) -> None:
    """Refuse a cache that lacks logits of ``rows``: an empty row would be read as zeros
    (uniform targets)."""
    missing = sum(len(cache.missing(v, rows)) for v in range(len(cache.done)))
    if missing:
        raise IncompleteCacheError(
            f"{cache.path}: the teacher-logit cache lacks {missing:,} image views this run "
            "needs; the first process of this machine filled another cache folder: give "
            "every process of a machine the same CIFAR100_CACHE"
        )


def fill_logits(
    cache: LogitCache,
    runner_of,
    images: torch.Tensor,
    rows: torch.Tensor,
    draws: AugmentParams,
    policy: AugmentConfig,
    device: torch.device,
) -> int:
    """Compute the missing (view, row) logits of ``rows``; return how many were computed.

    ``runner_of(n)`` gives the teacher to run for ``n`` images (compiled or not).
    """
    todo = [cache.missing(v, rows) for v in range(len(cache.done))]
    total = sum(len(index) for index in todo)
    if total == 0:
        return 0
    print(
        f"teacher logits: {total:,} image views to compute; later runs reuse them from "
        f"{cache.path.parent}",
        file=sys.stderr,
        flush=True,
    )
    spent_before, started = cache.seconds, time.perf_counter()

    def save() -> None:
        if spent_before is not None:  # an old file's cost stays unknown
            cache.seconds = spent_before + time.perf_counter() - started
        cache.save()

    runner, progress = runner_of(total), Progress(total, "teacher logits")
    try:
        for view, index in enumerate(todo):
            for start in range(0, len(index), EXTRACT_BATCH):
                part = index[start : start + EXTRACT_BATCH]
                params = draws.map(lambda d, v=view, r=part: d[v, r].to(device))
                batch = apply_augment(to_float(images[part].to(device)), policy, params)
                cache.logits[view, part] = runner(batch).half().cpu()
                cache.done[view, part] = True
                if progress.update(len(part)):
                    save()
    except KeyboardInterrupt as stop:
        save()
        raise interrupted(
            stop, f"{progress.done:,} teacher logits saved; the next run continues from there"
        ) from None
    finally:
        progress.close()
    save()
    return total


@dataclass
class ViewBatches(ImageBatches):
    """The training split served in its cached views (``augment`` is their policy).

    Training batches (a generator given) show every image in one of its views, drawn by
    the generator; the teacher's targets for exactly those views are then looked up for
    the same batch (``teacher_logits``). Without a generator: the plain images.
    """

    _: KW_ONLY
    draws: AugmentParams  # (views, N): this split's images' view draws, on the device
    logits: list[torch.Tensor]  # per teacher (views, N, classes) float16, on the device
    served: tuple[torch.Tensor, torch.Tensor] | None = None  # the last batch: indices, views

    def augmented(
        self, images: torch.Tensor, indices: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        count = len(self.logits[0])
        views = torch.randint(count, (len(indices),), generator=generator, device=generator.device)
        views = views.to(indices.device)
        self.served = (indices, views)
        return apply_augment(images, self.augment, self.draws.map(lambda d: d[views, indices]))

    def teacher_logits(self, indices: torch.Tensor) -> list[torch.Tensor]:
        """Each teacher's (B, classes) logits for the views of the batch just served."""
        # The step asks right after ``get`` with the same tensor; anything else would pair
        # images with another batch's targets, so it fails loudly (an identity test: no
        # device read).
        if self.served is None or self.served[0] is not indices:
            raise RuntimeError("teacher targets asked for a batch other than the one served")
        views = self.served[1]
        return [logits[views, indices] for logits in self.logits]


class CachedTeacher(Distiller):
    """Soft targets from the cached logits: they belong to the unmixed views, so the step
    mixes them as it mixes the labels."""

    sees_mixed_images = False

    def __init__(self, config, num_classes: int, batches: ViewBatches):
        super().__init__(config, num_classes)
        self.batches = batches

    def targets(self, inputs: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        return self.soft(self.batches.teacher_logits(indices))


def cached_teacher(
    run: Run, teachers: list[Teacher]
) -> tuple[ViewBatches, CachedTeacher, dict[str, Any]]:
    """The training batches in their views, their cached teacher, and what it cost.

    The time spent computing logits counts as this run's training time (as the feature
    extraction of transfer stage 1 does); a run that finds them cached pays nothing here,
    and records each file's own cost (``cache_seconds``, whoever paid it) instead.
    Under torchrun the first process of each machine computes what its cache lacks (rank 0
    first: a cache on shared storage is then complete for the others) while the other
    processes wait, then read the files.
    """
    cfg, full, rows = run.config.distill, run.dataset.train, run.splits.train_index
    policy = view_policy(run.config.augment)
    draws = view_draws(policy, cfg.views, cfg.view_seed, len(full))
    started, computed, logits, files, costs = time.perf_counter(), 0, [], [], []
    for teacher in teachers:
        key = cache_key(teacher.sha256, full.images, policy, cfg.views, cfg.view_seed, run.autocast)
        classes = len(teacher.trained.class_names)

        def fill(may_compute: bool, key=key, classes=classes, teacher=teacher) -> LogitCache:
            nonlocal computed
            cache = open_logits(key, len(full), classes)
            if not may_compute:  # another process of this machine has just filled it
                require_logits(cache, rows)
                return cache
            runner = _runner_of(run, teacher)
            computed += fill_logits(cache, runner, full.images, rows, draws, policy, run.device)
            return cache

        cache = distributed.main_first(fill)
        logits.append(cache.logits[:, rows].to(run.device))
        files.append(cache.path.name)
        costs.append(None if cache.seconds is None else round(cache.seconds, 3))
    seconds = time.perf_counter() - started
    run.elapsed += seconds
    own_draws = draws.map(lambda d: d[:, rows].to(run.device))
    batches = ViewBatches(
        run.splits.train, run.preprocess, run.device, policy, draws=own_draws, logits=logits
    )
    soft = CachedTeacher(cfg, len(run.dataset.class_names), batches)
    extra = {
        "views": cfg.views,
        "view_seed": cfg.view_seed,
        "cache_files": files,
        "logits_computed": computed,
        "logits_seconds": round(seconds, 1),
        # Whichever run computed them: with logits_seconds, what this run's minutes lack.
        "cache_seconds": costs,
    }
    return batches, soft, extra


def _runner_of(run: Run, teacher: Teacher):
    def runner(n: int) -> TeacherRunner:
        compiled = run.config.distill.compile and run.device.type == "cpu"
        compiled = compiled and n >= COMPILE_MIN_IMAGES  # compiling costs ~30-60 s on 2 cores
        return TeacherRunner(teacher.trained, EXTRACT_BATCH, run.autocast, compiled)

    return runner
