"""``cifar100 predict``: the top-K CIFAR-100 classes of any photo.

Each image is read by ``cifar100.images.read_image`` (any format and colour mode, centre
square, Lanczos to 32x32), then the model's own preprocessing runs. An image that cannot be
read gets a one-line error on stderr; the others are still answered, and the exit code is 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cifar100.commands.argtypes import positive_int
from cifar100.errors import UserError
from cifar100.images import ImageError, read_image

CHUNK = 256  # images read and classified at a time: bounded memory for any number of files


@dataclass
class Predictor:
    """A classifier from float [0, 1] (N, 3, 32, 32) images to logits, with class names."""

    class_names: list[str]
    logits: Callable[[torch.Tensor], torch.Tensor]
    source: str


@dataclass
class Prediction:
    image: str
    top: list[tuple[str, float]] = field(default_factory=list)
    error: str | None = None

    def to_json(self) -> dict:
        entry = {"image": self.image,
                 "top": [{"class": name, "probability": p} for name, p in self.top]}
        if self.error is not None:
            entry["error"] = self.error
        return entry


def register(subparsers) -> None:
    p = subparsers.add_parser("predict", help="top-K classes of any image file",
                              description=__doc__)
    p.add_argument("images", nargs="+", type=Path, metavar="IMAGE",
                   help="PNG, JPEG, BMP, WebP, ... of any size and colour mode")
    p.add_argument("--model", required=True, type=Path, metavar="RUN_DIR|FILE",
                   help="run directory (or .pt checkpoint), or a file from 'cifar100 export' "
                   "(.onnx, .safetensors)")
    p.add_argument("--top", type=positive_int, default=5, metavar="K",
                   help="how many classes to list per image (default: 5)")
    p.add_argument("--calibrated", action="store_true",
                   help="temperature-scaled probabilities (the temperature 'cifar100 evaluate' "
                   "fitted on the validation split; run directories and checkpoints only: an "
                   "exported file carries its own)")
    p.add_argument("--json", action="store_true",
                   help="print a JSON list of {image, top: [{class, probability}], error?}")
    p.set_defaults(func=run)


def load_predictor(path: str | Path, calibrated: bool = False) -> Predictor:
    """A run directory or .pt checkpoint (PyTorch), an .onnx (onnxruntime), a .safetensors.

    ``calibrated`` applies the run's fitted temperature; exported files carry their own.
    """
    path = Path(path)
    if calibrated and path.suffix in (".onnx", ".safetensors"):
        raise UserError(f"{path}: --calibrated applies to run directories and checkpoints; an "
                        "exported file keeps the temperature it was exported with "
                        "('cifar100 export --calibrated')")
    if path.suffix == ".onnx":
        from cifar100.export import OnnxClassifier

        onnx_model = OnnxClassifier(path)
        return Predictor(onnx_model.class_names, onnx_model.logits, str(path))
    if path.suffix == ".safetensors":
        from cifar100.export import load_safetensors

        trained = load_safetensors(path)
    else:
        from cifar100.inference import load_trained

        trained = load_trained(path, calibrated=calibrated)
    return Predictor(trained.class_names, trained.classifier(), str(path))


def predict_images(paths: list[Path], predictor: Predictor, top: int = 5) -> list[Prediction]:
    """Top-``top`` (class, probability) per image, in input order; errors kept per image."""
    predictions = [Prediction(str(path)) for path in paths]
    images = []
    for prediction, path in zip(predictions, paths, strict=True):
        try:
            images.append(read_image(path))
        except ImageError as error:
            prediction.error = str(error)
    readable = [p for p in predictions if p.error is None]
    if not readable:
        return predictions
    with torch.inference_mode():
        probs = torch.softmax(predictor.logits(torch.stack(images)).float(), dim=1)
    values, indices = probs.topk(min(top, probs.shape[1]), dim=1)
    for prediction, row_values, row_indices in zip(readable, values, indices, strict=True):
        prediction.top = [(predictor.class_names[int(i)], float(v))
                          for v, i in zip(row_values, row_indices, strict=True)]
    return predictions


def print_prediction(prediction: Prediction) -> None:
    print(prediction.image)
    for name, probability in prediction.top:
        print(f"  {probability:7.2%}  {name}")


def run(args: argparse.Namespace) -> int:
    predictor = load_predictor(args.model, args.calibrated)
    results = []
    for start in range(0, len(args.images), CHUNK):
        chunk = predict_images(args.images[start:start + CHUNK], predictor, args.top)
        for prediction in chunk:
            if prediction.error is not None:
                print(f"cifar100: error: {prediction.error}", file=sys.stderr)
            elif not args.json:
                print_prediction(prediction)
        results += chunk
    if args.json:
        print(json.dumps([p.to_json() for p in results], indent=2))
    return 1 if any(p.error is not None for p in results) else 0
