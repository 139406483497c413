"""A trained classifier, loaded from whatever holds one: a run directory, a ``.pt``
checkpoint, or a file ``cifar100 export`` wrote (``.onnx``, ``.safetensors``).

``load_model`` gives one ``Classifier`` for all of them: float [0, 1] (N, 3, 32, 32) images
or image files in, class names and probabilities out. Files are read by
``cifar100.images.read_image`` (any format and colour mode, centre square, Lanczos to
32x32), then the model's own preprocessing runs. ``load_trained`` gives the PyTorch model of
a run or checkpoint itself, with its preprocessing and metadata (for evaluation and export).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cifar100.checkpoint import CheckpointError, load_checkpoint
from cifar100.config import ConfigError, from_saved
from cifar100.errors import UserError
from cifar100.images import ImageError, read_image
from cifar100.models import build_model
from cifar100.preprocess import Preprocess

# What every checkpoint written by cifar100.training holds besides the weights.
REQUIRED_KEYS = ("model", "config", "class_names", "superclass_names", "fine_to_coarse",
                 "preprocess")
CHUNK = 256  # image files read and classified at a time: bounded memory for any number


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
        from cifar100.calibration import Temperature

        return nn.Sequential(self.preprocess, self.model, Temperature(self.temperature)).eval()


def checkpoint_path(run_or_file: str | Path) -> Path:
    path = Path(run_or_file)
    if path.is_dir():
        path = path / "checkpoints" / "best.pt"
    if not path.is_file():
        raise CheckpointError(f"{path}: no trained model here (expected a run directory "
                              "holding checkpoints/best.pt, or a .pt file)")
    return path


def load_trained(run_or_file: str | Path, device: str | torch.device = "cpu",
                 calibrated: bool = False) -> TrainedModel:
    """The best checkpoint of a run (or a .pt file) in eval mode on ``device``.

    ``calibrated=True`` divides its logits by the temperature that ``cifar100 evaluate``
    fitted on the validation split (RUN/calibration.json).
    """
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
        from cifar100.calibration import load_temperature

        temperature = load_temperature(path)
    return TrainedModel(model, preprocess, state["class_names"], state["superclass_names"],
                        state["fine_to_coarse"], metadata, temperature)


@dataclass
class Prediction:
    """One image's ``top`` (class name, probability) pairs, most likely first; or, for a
    file that could not be read, no pairs and the ``error``."""

    image: str
    top: list[tuple[str, float]] = field(default_factory=list)
    error: str | None = None

    def to_json(self) -> dict:
        """As ``cifar100 predict --json`` prints it."""
        entry = {"image": self.image,
                 "top": [{"class": name, "probability": p} for name, p in self.top]}
        if self.error is not None:
            entry["error"] = self.error
        return entry

    def __str__(self) -> str:
        """What ``cifar100 predict`` prints: the image, then one line per class."""
        return "\n".join([self.image] + [f"  {p:7.2%}  {name}" for name, p in self.top])


@dataclass
class Classifier:
    """A trained classifier, whatever it was loaded from (see ``load_model``).

    Attributes:
        class_names: the class names, in the order of the logits' columns.
        logits: float [0, 1] images (N, 3, 32, 32) -> logits (N, classes), the model's
            preprocessing (and, when calibrated, its temperature) included.
        source: the path it was loaded from.
        trained: the PyTorch model with its checkpoint's metadata; None for an ONNX file.
    """

    class_names: list[str]
    logits: Callable[[torch.Tensor], torch.Tensor]
    source: str
    trained: TrainedModel | None = None

    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """Softmax probabilities (N, classes) of float [0, 1] or uint8 (N, 3, 32, 32) images."""
        if images.dtype == torch.uint8:
            images = images.float() / 255.0
        with torch.inference_mode():
            return torch.softmax(self.logits(images).float(), dim=1)

    def predict(self, images: torch.Tensor | str | Path | Sequence[str | Path],
                top: int = 5) -> list[Prediction]:
        """The ``top`` classes of each image, in input order.

        Args:
            images: image files (one path or several; any format Pillow reads, any size), or
                a tensor as ``probabilities`` takes. A file that cannot be read gets its
                ``error`` and no classes; the others are still answered.
            top: how many classes per image.
        """
        if isinstance(images, torch.Tensor):
            predictions = [Prediction(f"images[{i}]") for i in range(len(images))]
            self._fill(predictions, self.probabilities(images), top)
            return predictions
        paths = [images] if isinstance(images, (str, Path)) else list(images)
        predictions = []
        for start in range(0, len(paths), CHUNK):
            predictions += self._predict_files(paths[start:start + CHUNK], top)
        return predictions

    def _predict_files(self, paths: list[str | Path], top: int) -> list[Prediction]:
        predictions = [Prediction(str(path)) for path in paths]
        images = []
        for prediction, path in zip(predictions, paths, strict=True):
            try:
                images.append(read_image(path))
            except ImageError as error:
                prediction.error = str(error)
        readable = [p for p in predictions if p.error is None]
        if readable:
            self._fill(readable, self.probabilities(torch.stack(images)), top)
        return predictions

    def _fill(self, predictions: list[Prediction], probs: torch.Tensor, top: int) -> None:
        values, indices = probs.topk(min(top, probs.shape[1]), dim=1)
        for prediction, row_values, row_indices in zip(predictions, values, indices,
                                                       strict=True):
            prediction.top = [(self.class_names[int(i)], float(v))
                              for v, i in zip(row_values, row_indices, strict=True)]


def load_model(path: str | Path, calibrated: bool = False) -> Classifier:
    """The classifier in ``path``, on the CPU: a run directory or ``.pt`` checkpoint
    (PyTorch), an ``.onnx`` file (onnxruntime) or a ``.safetensors`` file.

    ``calibrated`` applies the run's fitted temperature (``cifar100 evaluate`` fits it); an
    exported file carries the temperature it was exported with, so it refuses the flag.
    """
    path = Path(path)
    if calibrated and path.suffix in (".onnx", ".safetensors"):
        raise UserError(f"{path}: --calibrated applies to run directories and checkpoints; an "
                        "exported file keeps the temperature it was exported with "
                        "('cifar100 export --calibrated')")
    if path.suffix == ".onnx":
        from cifar100.exports import OnnxClassifier

        onnx_model = OnnxClassifier(path)
        return Classifier(onnx_model.class_names, onnx_model.logits, str(path))
    if path.suffix == ".safetensors":
        from cifar100.exports import load_safetensors

        trained = load_safetensors(path)
    else:
        trained = load_trained(path, calibrated=calibrated)
    return Classifier(trained.class_names, trained.classifier(), str(path), trained)
