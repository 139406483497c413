"""A run's logits on its validation and test images, kept in ``RUN/predictions/``.

Choosing an ensemble's members, re-reporting with other TTA, or scoring a run again
repeats the same forward passes: minutes per run on a CPU (10,000 images at 160 px).
Each file is tied to the sha256 of the checkpoint and of the images it scored, so a
retrained run or another data set is never scored with stale logits: a mismatch, or an
unreadable file, is simply computed again. The files are derived data; deleting
``RUN/predictions/`` costs only time.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from cifar100.data.batches import ImageBatches, capped_batch
from cifar100.data.cifar import Cifar100, Split, make_splits
from cifar100.errors import UserError
from cifar100.evaluation.inference import InferenceSettings, predict_logits, tta_views
from cifar100.runs.trained import TrainedModel, checkpoint_path
from cifar100.runtime.download import file_digest
from cifar100.runtime.speed import inference_runner, precision_name

FOLDER = "predictions"
VERSION = 1


def images_digest(images: torch.Tensor) -> str:
    """sha256 of a uint8 image tensor's bytes (30 MB for 10,000 images: ~0.1 s)."""
    return hashlib.sha256(images.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def views_name(tta_flip: bool, tta_translate: int) -> str:
    """``plain``, ``flip``, ``shift2`` or ``flip-shift2``: the TTA views a file averages."""
    parts = (["flip"] if tta_flip else []) + ([f"shift{tta_translate}"] if tta_translate else [])
    return "-".join(parts) or "plain"


def cache_path(
    run_dir: Path, split_name: str, tta_flip: bool, tta_translate: int, precision: str = "fp32"
) -> Path:
    suffix = "" if precision == "fp32" else f"-{precision}"
    return run_dir / FOLDER / f"{split_name}-{views_name(tta_flip, tta_translate)}{suffix}.pt"


def run_logits(
    run_dir: Path,
    trained: TrainedModel,
    split: Split,
    split_name: str,
    settings: InferenceSettings,
) -> torch.Tensor:
    """(N, 100) float32 logits of the run's best checkpoint on ``split``, its TTA views
    averaged: read from RUN/predictions/ when they were computed for this very checkpoint
    and these images, otherwise computed (and kept there for the next time)."""
    tta_flip, tta_translate = settings.tta_flip, settings.tta_translate
    autocast = settings.autocast(trained.metadata["config_obj"].train.precision)
    precision = precision_name(autocast)
    path = cache_path(run_dir, split_name, tta_flip, tta_translate, precision)
    key = {
        "version": VERSION,
        "checkpoint_sha256": file_digest(checkpoint_path(run_dir)),
        "images_sha256": images_digest(split.images),
        "tta_flip": bool(tta_flip),
        "tta_translate": int(tta_translate),
        "precision": precision,
    }
    cached = _read(path, key, len(split))
    if cached is not None:
        print(f"{run_dir}: {split_name} logits read from {path}", file=sys.stderr, flush=True)
        return cached
    print(
        f"{run_dir}: predicting {len(split):,} {split_name} images"
        f"{' and their mirrors' if tta_flip else ''}"
        f"{f' and shifts by {tta_translate} px' if tta_translate else ''}"
        f"{'' if autocast is None else f' under {precision} autocast'}",
        file=sys.stderr,
        flush=True,
    )
    size = trained.preprocess.size
    views = len(tta_views(tta_flip, tta_translate))
    batch = capped_batch(settings.batch_size, size)
    model = inference_runner(trained.model, settings.device, len(split) * views, size, batch)
    batches = ImageBatches(split, trained.preprocess, settings.device)
    logits = predict_logits(model, batches, batch, tta_flip, autocast, tta_translate)
    _write(path, {**key, "logits": logits})
    return logits


def _read(path: Path, key: dict[str, Any], images: int) -> torch.Tensor | None:
    """The cached logits if ``path`` holds them for ``key``; None to compute them again."""
    if not path.is_file():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        logits = saved["logits"]
        matches = all(saved.get(name) == value for name, value in key.items())
    except Exception as error:  # a cache must never stop an evaluation: recompute instead
        print(f"{path}: unreadable ({type(error).__name__}); computing again", file=sys.stderr)
        return None
    if not matches or not isinstance(logits, torch.Tensor) or len(logits) != images:
        return None  # another checkpoint or other images: stale, silently replaced
    return logits.float()


def _write(path: Path, values: dict[str, Any]) -> None:
    """Atomically, so a crash leaves the old file or the new; a failure costs only the cache."""
    tmp_name = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            torch.save(values, f)
        os.replace(tmp_name, path)
    except OSError as error:
        if tmp_name is not None:
            Path(tmp_name).unlink(missing_ok=True)
        print(
            f"{path}: logits not kept ({error.strerror or error}); the next evaluation "
            "computes them again",
            file=sys.stderr,
        )


def validation_logits(
    run_dir: Path,
    trained: TrainedModel,
    dataset: Cifar100,
    settings: InferenceSettings,
) -> tuple[Split, torch.Tensor, torch.Tensor]:
    """The run's own validation split, its plain logits, and its logits with the TTA views
    averaged (the plain tensor itself when there are no views)."""
    split = trained.validation_split
    if split is None:
        raise UserError(f"{run_dir}: trained on every training image (refit): no validation split")
    val = make_splits(dataset, *split).val
    plain = run_logits(run_dir, trained, val, "val", settings.plain)
    if not settings.augmented:
        return val, plain, plain
    viewed = run_logits(run_dir, trained, val, "val", settings)
    return val, plain, viewed
