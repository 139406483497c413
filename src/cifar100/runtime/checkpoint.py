"""Atomic checkpoints: a crash or a full disk mid-write never costs the last good one.

A checkpoint is one dict (model, optimizer, scheduler, epoch, RNG states, config, class
names, normalisation), in the spirit of torchvision's references. It is written to a
temporary file in the same folder, flushed to disk, then renamed over the old one:
``os.replace`` is atomic, so readers see either the old file or the new, never half.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from cifar100.errors import UserError


class CheckpointError(UserError):
    """A checkpoint that cannot be written or read; the message names the file."""


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except OSError as error:
        Path(tmp_name).unlink(missing_ok=True)
        raise CheckpointError(
            f"{path}: could not save checkpoint ({error.strerror or error})"
        ) from None
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load with ``weights_only=True``: a checkpoint file can never run code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for corrupt files
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(error).__name__})") from None


def rng_state(generator: torch.Generator) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "generator": generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any], generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    restore_generator(generator, state["generator"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"][: torch.cuda.device_count()]  # saved on a machine with more GPUs
        torch.cuda.set_rng_state_all(cuda)


def restore_generator(generator: torch.Generator, saved: torch.Tensor) -> None:
    """Give ``generator`` its saved state, if the state was saved from the same kind of device.

    A CPU generator's state (5 kB of Mersenne Twister) means nothing to a CUDA generator
    (seed and offset), and back: a run moved between a GPU and a CPU keeps its seeded
    generator instead, so it resumes at the same step, with other random augmentations.
    """
    if saved.numel() == generator.get_state().numel():
        generator.set_state(saved)
        return
    print(
        f"resuming on {generator.device.type}: the augmentation random state was saved on "
        "another kind of device; continuing from the seed instead",
        file=sys.stderr,
    )
