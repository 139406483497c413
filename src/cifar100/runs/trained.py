"""A trained PyTorch model back from its checkpoint: the model in eval mode, its
preprocessing, class names and metadata (what evaluation, calibration and export need).

``cifar100.deploy.classifier.load_model`` builds the user-facing ``Classifier`` on top of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cifar100.config.schema import ConfigError, from_saved
from cifar100.data.preprocess import Preprocess
from cifar100.models import build_model
from cifar100.runs.temperature import Temperature, load_temperature
from cifar100.runtime.allocator import tune_allocator
from cifar100.runtime.checkpoint import CheckpointError, load_checkpoint

# What every checkpoint written by cifar100.training.train holds besides the weights.
REQUIRED_KEYS = (
    "model",
    "config",
    "class_names",
    "superclass_names",
    "fine_to_coarse",
    "preprocess",
)


@dataclass
class TrainedModel:
    model: nn.Module  # eval mode, on CPU
    preprocess: Preprocess  # float [0, 1] 32x32 -> the model's normalised input
    class_names: list[str]
    superclass_names: list[str]
    fine_to_coarse: list[int]
    metadata: dict[str, Any]  # the rest of the checkpoint: config, stage, epoch, val metrics
    temperature: float = 1.0  # logits are divided by it (temperature scaling); 1: raw

    def classifier(self) -> nn.Module:
        """One module from float [0, 1] images (B, 3, 32, 32) to logits (B, 100)."""
        if self.temperature == 1.0:
            return nn.Sequential(self.preprocess, self.model).eval()
        return nn.Sequential(self.preprocess, self.model, Temperature(self.temperature)).eval()

    @property
    def validation_split(self) -> tuple[float, int] | None:
        """(val_fraction, split_seed) of the images it never trained on; None after a refit,
        which trained on every training image and so has no held-out images left."""
        config = self.metadata["config_obj"]
        if config.train.refit:
            return None
        return config.data.val_fraction, config.data.split_seed


def checkpoint_path(run_or_file: str | Path) -> Path:
    path = Path(run_or_file)
    if path.is_dir():
        path = path / "checkpoints" / "best.pt"
    if not path.is_file():
        raise CheckpointError(
            f"{path}: no trained model here (expected a run directory "
            "holding checkpoints/best.pt, or a .pt file)"
        )
    return path


def load_trained(
    run_or_file: str | Path, device: str | torch.device = "cpu", calibrated: bool = False
) -> TrainedModel:
    """The best checkpoint of a run (or a .pt file) in eval mode on ``device``.

    ``calibrated=True`` divides its logits by the temperature that ``cifar100 evaluate``
    fitted on the validation split (RUN/calibration.json).
    """
    # Inference faults its activation buffers in again each batch as training does (2x the
    # time on a 2-core VM); the CLI tunes at start-up, API and benchmark callers get it here.
    tune_allocator()
    path = checkpoint_path(run_or_file)
    state = load_checkpoint(path)
    missing = [key for key in REQUIRED_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise CheckpointError(f"{path}: not a cifar100 checkpoint (no {', '.join(missing)})")
    try:
        config = from_saved(state["config"])
        model = build_model(config.model, len(state["class_names"]))
        model.load_state_dict(state["model"])
    except (ConfigError, RuntimeError) as error:
        reason = str(error).splitlines()[0][:200]
        raise CheckpointError(f"{path}: cannot rebuild its model ({reason})") from None
    p = state["preprocess"]
    preprocess = Preprocess(p["size"], p["mean"], p["std"])
    model.to(device).eval()
    preprocess.to(device)
    metadata = {k: v for k, v in state.items() if k not in {"model", "class_names"}}
    metadata["config_obj"] = config
    temperature = 1.0
    if calibrated:
        temperature = load_temperature(path)
    return TrainedModel(
        model,
        preprocess,
        state["class_names"],
        state["superclass_names"],
        state["fine_to_coarse"],
        metadata,
        temperature,
    )
