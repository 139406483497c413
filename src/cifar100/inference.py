"""Load a trained model back from a run directory (or a checkpoint file) for inference."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cifar100.checkpoint import CheckpointError, load_checkpoint
from cifar100.config import from_dict
from cifar100.engine import Preprocess
from cifar100.models import build_model


@dataclass
class TrainedModel:
    model: nn.Module  # eval mode, on CPU
    preprocess: Preprocess  # float [0, 1] 32x32 -> the model's normalised input
    class_names: list[str]
    superclass_names: list[str]
    fine_to_coarse: list[int]
    metadata: dict[str, Any]  # the rest of the checkpoint: config, stage, epoch, val metrics

    def classifier(self) -> nn.Module:
        """One module from float [0, 1] images (B, 3, 32, 32) to logits (B, 100)."""
        return nn.Sequential(self.preprocess, self.model).eval()


def checkpoint_path(run_or_file: str | Path) -> Path:
    path = Path(run_or_file)
    if path.is_dir():
        path = path / "checkpoints" / "best.pt"
    if not path.is_file():
        raise CheckpointError(f"{path}: no trained model here (expected a run directory "
                              "holding checkpoints/best.pt, or a .pt file)")
    return path


def load_trained(run_or_file: str | Path, device: str | torch.device = "cpu") -> TrainedModel:
    state = load_checkpoint(checkpoint_path(run_or_file))
    config = from_dict(state["config"])
    model = build_model(config.model, len(state["class_names"]))
    model.load_state_dict(state["model"])
    p = state["preprocess"]
    preprocess = Preprocess(p["size"], p["mean"], p["std"])
    model.to(device).eval()
    preprocess.to(device)
    metadata = {k: v for k, v in state.items() if k not in {"model", "class_names"}}
    metadata["config_obj"] = config
    return TrainedModel(model, preprocess, state["class_names"], state["superclass_names"],
                        state["fine_to_coarse"], metadata)
