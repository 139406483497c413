"""``cifar100 predict``: the top-K CIFAR-100 classes of any photo.

Each image is read by ``cifar100.data.images.read_image`` (any format and colour mode, centre
square, Lanczos to 32x32), then the model's own preprocessing runs. An image that cannot be
read gets a one-line error on stderr; the others are still answered, and the exit code is 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cifar100.deploy.classifier import load_model
from cifar100.recipes.argtypes import positive_int
from cifar100.recipes.shared_flags import add_shared


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "images",
        nargs="+",
        type=Path,
        metavar="IMAGE",
        help="PNG, JPEG, BMP, WebP, ... of any size and colour mode",
    )
    add_shared(p, "predict", "model")
    p.add_argument(
        "--top",
        type=positive_int,
        default=5,
        metavar="K",
        help="how many classes to list per image (default: 5)",
    )
    add_shared(p, "predict", "calibrated", "json")


def run(args: argparse.Namespace) -> int:
    model = load_model(args.model, args.calibrated)
    results = []
    for prediction in model.predict_each(args.images, args.top):  # printed as they are ready
        if prediction.error is not None:
            print(f"cifar100: error: {prediction.error}", file=sys.stderr)
        elif not args.json:
            print(prediction)
        results.append(prediction)
    if args.json:
        print(json.dumps([p.to_json() for p in results], indent=2))
    return 1 if any(p.error is not None for p in results) else 0
