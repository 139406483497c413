"""The teachers of knowledge distillation: trained runs, loaded, checked and recorded.

A teacher is a run folder (its best checkpoint) or a ``.pt`` checkpoint; several form an
ensemble (``cifar100.training.distill.loss``). Every teacher is checked before any folder is made
(``check_teachers``): it exists, it predicts this data set's 100 classes, and it never
trained on this run's validation images: it was validated on the same split
(``data.split_seed``, ``data.val_fraction``) and is no refit. Otherwise those images'
labels would reach the student through the teacher's soft targets, and the student's
validation accuracy would flatter it. A refit student validates nothing: any teacher.

The run keeps each teacher's checkpoint, sha256, model and its own training minutes and
test accuracy in run.json (results.json and the record copy them); a resumed run refuses
a teacher whose checkpoint changed since it started.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cifar100.config.schema import Config
from cifar100.data.batches import capped_batch
from cifar100.data.cifar import NUM_CLASSES
from cifar100.errors import UserError
from cifar100.runs.folders import read_json, write_json
from cifar100.runs.trained import TrainedModel, checkpoint_path, load_trained
from cifar100.runtime import distributed
from cifar100.runtime.checkpoint import CheckpointError
from cifar100.runtime.download import file_digest
from cifar100.training.features import CompiledOrEager

COUNTED = ("logits_computed", "logits_seconds")  # the cached mode's work, summed over resumes


class TeacherError(UserError):
    """A teacher that cannot be used; the message names it and says why."""


@dataclass
class Teacher:
    source: str  # as given (--teacher)
    checkpoint: Path
    sha256: str
    trained: TrainedModel

    def info(self) -> dict[str, Any]:
        """What the run records about it: which checkpoint exactly, and what it cost."""
        results = _run_results(self.checkpoint)
        return {
            "source": self.source,
            "checkpoint": str(self.checkpoint),
            "sha256": self.sha256,
            "model": self.trained.metadata.get("model_name"),
            "image_size": self.trained.preprocess.size,
            "refit": self.trained.metadata["config_obj"].train.refit,
            "train_minutes": results.get("train_minutes"),
            "test_top1": results.get("test_top1"),
        }


def _run_results(checkpoint: Path) -> dict[str, Any]:
    """The teacher run's results.json, when the checkpoint sits in a run folder."""
    path = checkpoint.parent.parent / "results.json"
    try:
        return read_json(path) if checkpoint.parent.name == "checkpoints" else {}
    except (OSError, ValueError):
        return {}


def load_teacher(source: str, device: str | torch.device = "cpu") -> Teacher:
    try:
        path = checkpoint_path(source)
        trained = load_trained(path, device)
    except CheckpointError as error:
        raise TeacherError(f"teacher {error}") from None
    return Teacher(source, path, file_digest(path), trained)


def check_teacher(teacher: Teacher, config: Config, class_names: list[str] | None = None):
    """Refuse a teacher of other classes, or one that trained on this run's validation."""
    names, source = teacher.trained.class_names, teacher.source
    if len(names) != NUM_CLASSES or (class_names is not None and names != class_names):
        raise TeacherError(
            f"teacher {source}: its {len(names)} classes are not this data set's "
            f"{NUM_CLASSES} (trained on another data set?)"
        )
    if config.train.refit:
        return  # nothing is validated: no validation image to protect
    theirs_config, mine = teacher.trained.metadata["config_obj"], config.data
    if theirs_config.train.refit:
        raise TeacherError(
            f"teacher {source}: a refit, trained on every training image, this run's "
            "validation images included; their labels would reach the student through "
            "its soft targets (use a teacher trained on the split, or --refit)"
        )
    theirs = (theirs_config.data.split_seed, theirs_config.data.val_fraction)
    if theirs != (mine.split_seed, mine.val_fraction):
        raise TeacherError(
            f"teacher {source}: validated on another split (data.split_seed "
            f"{theirs[0]}, val_fraction {theirs[1]}; this run: {mine.split_seed}, "
            f"{mine.val_fraction}), so it trained on some of this run's validation images "
            "and would leak their labels to the student"
        )


def check_teachers(config: Config) -> None:
    """Every teacher of ``config`` exists and may teach it (loaded on CPU, then dropped)."""
    for source in config.distill.teachers:
        check_teacher(load_teacher(source), config)


def load_teachers(config: Config, device: torch.device, class_names: list[str]) -> list[Teacher]:
    teachers = [load_teacher(source, device) for source in config.distill.teachers]
    for teacher in teachers:
        check_teacher(teacher, config, class_names)
    return teachers


class TeacherRunner:
    """A teacher as a function: float [0, 1] images (B, 3, H, W) -> float32 logits, in
    eval mode without gradients, resized and normalised by its own preprocessing.

    Batches of ``batch`` images run in equal chunks under ``MAX_BATCH_PIXELS`` (a 160 px
    teacher's activations would otherwise leave the tuned allocator); compiled, every
    chunk is padded to one static shape (a recompile costs ~30-60 s on 2 cores).
    """

    def __init__(
        self, trained: TrainedModel, batch: int, autocast: torch.dtype | None, compiled: bool
    ):
        chunks = -(-batch // capped_batch(batch, trained.preprocess.size))
        self.chunk = -(-batch // chunks)
        model = trained.model.to(memory_format=torch.channels_last).eval()
        self.model = CompiledOrEager(model) if compiled else model
        self.compiled, self.preprocess, self.autocast = compiled, trained.preprocess, autocast

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        outputs = []
        for start in range(0, len(images), self.chunk):
            part = images[start : start + self.chunk]
            n = len(part)
            if self.compiled and n < self.chunk:
                part = torch.cat([part, part[:1].expand(self.chunk - n, -1, -1, -1)])
            x = self.preprocess(part).contiguous(memory_format=torch.channels_last)
            with torch.autocast(
                x.device.type,
                dtype=self.autocast or torch.float32,
                enabled=self.autocast is not None,
            ):
                outputs.append(self.model(x)[:n].float())
        return torch.cat(outputs)


def _recorded(run_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """run.json, and the distillation it records (a resumed run's; empty for a new one)."""
    path = run_dir / "run.json"
    info = read_json(path) if path.is_file() else {}
    return info, info.get("distill") or {}


def refuse_changed(run_dir: Path, teachers: list[Teacher]) -> None:
    """A resumed run continues with the teachers it started with, byte for byte."""
    before = {t["source"]: t["sha256"] for t in _recorded(run_dir)[1].get("teachers", [])}
    for teacher in teachers:
        old = before.get(teacher.source)
        if old is not None and old != teacher.sha256:
            raise TeacherError(
                f"teacher {teacher.source}: its checkpoint changed since this run started "
                f"(sha256 {old[:12]}... now {teacher.sha256[:12]}...); resuming would train "
                "against another teacher: start a new run"
            )


def record_teachers(
    run_dir: Path, config: Config, teachers: list[Teacher], extra: dict[str, Any]
) -> dict[str, Any]:
    """Write the distillation's teachers and settings into run.json (results.json and
    the record copy them)."""
    info, previous = _recorded(run_dir)
    d = config.distill
    entry = {
        "teachers": [t.info() for t in teachers],
        "ensemble": "mean of the teachers' probabilities at the temperature",
        "mode": d.mode,
        "temperature": d.temperature,
        "weight": d.weight,
        "standardize": d.standardize,
        **extra,
    }
    for key in COUNTED:  # a resume adds its own work to what the run did before
        if key in entry:
            entry[key] = round(entry[key] + previous.get(key, 0), 1)
    if distributed.is_main():
        info["distill"] = entry
        write_json(run_dir / "run.json", info)
    return entry
