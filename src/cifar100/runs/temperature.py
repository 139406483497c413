"""A run's fitted temperature: the ``Temperature`` layer a calibrated classifier ends with,
and ``RUN/calibration.json``, tied to the checkpoint it was fitted for. Fitting it is
``cifar100.evaluation.calibration``; reading it back is all a trained model needs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from cifar100.errors import UserError
from cifar100.runs.folders import read_json, write_json
from cifar100.runtime.download import file_digest

FILE = "calibration.json"


class CalibrationError(UserError):
    """No usable temperature for a model; the message says how to get one."""


class Temperature(nn.Module):
    """logits (B, C) -> logits / T: the last layer of a calibrated classifier."""

    def __init__(self, temperature: float):
        super().__init__()
        self.register_buffer("temperature", torch.tensor(float(temperature)))

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return logits / self.temperature


def calibration_file(checkpoint: Path) -> Path:
    """RUN/calibration.json for RUN/checkpoints/NAME.pt."""
    if checkpoint.parent.name != "checkpoints":
        raise CalibrationError(
            f"{checkpoint}: temperature scaling needs a run directory "
            "(its calibration.json is written by 'cifar100 evaluate RUN')"
        )
    return checkpoint.parent.parent / FILE


def save_calibration(checkpoint: Path, values: dict[str, Any]) -> Path:
    """Write the fitted temperature beside the run, tied to this checkpoint's sha256."""
    path = calibration_file(checkpoint)
    write_json(
        path,
        {**values, "checkpoint": checkpoint.name, "checkpoint_sha256": file_digest(checkpoint)},
    )
    return path


def load_temperature(checkpoint: Path) -> float:
    """The temperature fitted for ``checkpoint``; an error if missing or fitted for another."""
    path = calibration_file(checkpoint)
    hint = f"run 'cifar100 evaluate {checkpoint.parent.parent}' to fit it"
    if not path.is_file():
        raise CalibrationError(f"{path}: no fitted temperature; {hint}")
    try:
        values = read_json(path)
        temperature, digest = float(values["temperature"]), values["checkpoint_sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        raise CalibrationError(f"{path}: unreadable; {hint} again") from None
    if values.get("checkpoint") != checkpoint.name or digest != file_digest(checkpoint):
        raise CalibrationError(
            f"{path}: fitted for another checkpoint than {checkpoint} "
            f"(the run changed since); {hint} again"
        )
    return temperature
