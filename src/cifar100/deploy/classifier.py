"""A trained classifier, loaded from whatever holds one: a run directory, a ``.pt``
checkpoint, a file ``cifar100 export`` wrote (``.onnx``, ``.safetensors``), or the model
folder of ``cifar100 export --format hub``.

``load_model`` gives one ``Classifier`` for all of them: float [0, 1] (N, 3, 32, 32) images
or image files in, class names and probabilities out. Files are read by
``cifar100.data.images.read_image`` (any format and colour mode, centre square, Lanczos to
32x32), then the model's own preprocessing runs. ``load_trained`` gives the PyTorch model of
a run or checkpoint itself, with its preprocessing and metadata (for evaluation and export).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cifar100.data.images import ImageError, read_image
from cifar100.errors import UserError
from cifar100.runs.trained import TrainedModel, load_trained

CHUNK = 256  # image files read and classified at a time: bounded memory for any number


@dataclass
class Prediction:
    """One image's ``top`` (class name, probability) pairs, most likely first; or, for a
    file that could not be read, no pairs and the ``error``."""

    image: str
    top: list[tuple[str, float]] = field(default_factory=list)
    error: str | None = None

    def to_json(self) -> dict:
        """As ``cifar100 predict --json`` prints it."""
        entry = {
            "image": self.image,
            "top": [{"class": name, "probability": p} for name, p in self.top],
        }
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
        superclass_names: the 20 superclass names (empty when the source does not say).
        fine_to_coarse: each class's superclass index, in ``class_names`` order.
        metadata: what the source says about the model: the checkpoint's metadata (config,
            stage, epoch, validation metrics), or an exported file's metadata strings.
    """

    class_names: list[str]
    logits: Callable[[torch.Tensor], torch.Tensor]
    source: str
    trained: TrainedModel | None = None
    superclass_names: list[str] = field(default_factory=list)
    fine_to_coarse: list[int] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)

    def superclass(self, class_name: str) -> str | None:
        """The superclass of ``class_name`` (None when the source does not say): CIFAR-100
        counts a fine prediction as superclass-right when it lands in the true superclass."""
        if not self.fine_to_coarse:
            return None
        return self.superclass_names[self.fine_to_coarse[self.class_names.index(class_name)]]

    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """Softmax probabilities (N, classes) of float [0, 1] or uint8 (N, 3, 32, 32) images."""
        if images.dtype == torch.uint8:
            images = images.float() / 255.0
        with torch.inference_mode():
            return torch.softmax(self.logits(images).float(), dim=1)

    def predict(
        self, images: torch.Tensor | str | Path | Sequence[str | Path], top: int = 5
    ) -> list[Prediction]:
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
        return list(self.predict_each([images] if isinstance(images, (str, Path)) else images, top))

    def predict_each(self, paths: Sequence[str | Path], top: int = 5) -> Iterator[Prediction]:
        """``predict``'s answers for image files, one by one as each ``CHUNK`` of them is
        classified: a long list shows its first answers at once."""
        paths = list(paths)
        for start in range(0, len(paths), CHUNK):
            yield from self._predict_files(paths[start : start + CHUNK], top)

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
        for prediction, row_values, row_indices in zip(predictions, values, indices, strict=True):
            prediction.top = [
                (self.class_names[int(i)], float(v))
                for v, i in zip(row_values, row_indices, strict=True)
            ]


def load_model(path: str | Path, calibrated: bool = False) -> Classifier:
    """The classifier in ``path``, on the CPU: a run directory or ``.pt`` checkpoint
    (PyTorch), an ``.onnx`` file (onnxruntime), a ``.safetensors`` file, or a model folder
    from ``cifar100 export --format hub``.

    ``calibrated`` applies the run's fitted temperature (``cifar100 evaluate`` fits it); an
    exported file carries the temperature it was exported with, so it refuses the flag.
    """
    from cifar100.deploy.hub import is_hub_folder, load_hub

    path = Path(path)
    exported = path.suffix in (".onnx", ".safetensors") or is_hub_folder(path)
    if calibrated and exported:
        raise UserError(
            f"{path}: --calibrated applies to run directories and checkpoints; an "
            "exported model keeps the temperature it was exported with "
            "('cifar100 export --calibrated')"
        )
    if path.suffix == ".onnx":
        return _load_onnx(path)
    if path.suffix == ".safetensors":
        from cifar100.deploy.exports import load_safetensors

        trained = load_safetensors(path)
    elif is_hub_folder(path):
        trained = load_hub(path)
    else:
        trained = load_trained(path, calibrated=calibrated)
    return Classifier(
        trained.class_names,
        trained.classifier(),
        str(path),
        trained,
        trained.superclass_names,
        trained.fine_to_coarse,
        trained.metadata,
    )


def _load_onnx(path: Path) -> Classifier:
    from cifar100.deploy.exports import OnnxClassifier

    onnx_model = OnnxClassifier(path)
    meta = onnx_model.metadata
    # cifar100 export always names them; a file edited elsewhere just shows no superclass.
    superclasses = json.loads(meta.get("superclass_names", "[]"))
    fine_to_coarse = json.loads(meta.get("fine_to_coarse", "[]"))
    return Classifier(
        onnx_model.class_names,
        onnx_model.logits,
        str(path),
        None,
        superclasses,
        fine_to_coarse,
        dict(meta),
    )
