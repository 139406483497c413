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

from cifar100.deploy.classifier import CHUNK, load_model
from cifar100.recipes.argtypes import positive_int


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "predict", help="top-K classes of any image file", description=__doc__
    )
    p.add_argument(
        "images",
        nargs="+",
        type=Path,
        metavar="IMAGE",
        help="PNG, JPEG, BMP, WebP, ... of any size and colour mode",
    )
    p.add_argument(
        "--model",
        required=True,
        type=Path,
        metavar="RUN_DIR|FILE|FOLDER",
        help="run directory (or .pt checkpoint), or what 'cifar100 export' wrote "
        "(.onnx, .safetensors, or the --format hub folder)",
    )
    p.add_argument(
        "--top",
        type=positive_int,
        default=5,
        metavar="K",
        help="how many classes to list per image (default: 5)",
    )
    p.add_argument(
        "--calibrated",
        action="store_true",
        help="temperature-scaled probabilities (the temperature 'cifar100 evaluate' "
        "fitted on the validation split; run directories and checkpoints only: an "
        "exported file carries its own)",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print a JSON list of {image, top: [{class, probability}], error?}",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    model = load_model(args.model, args.calibrated)
    results = []
    for start in range(0, len(args.images), CHUNK):  # answers appear as they are ready
        chunk = model.predict(args.images[start : start + CHUNK], args.top)
        for prediction in chunk:
            if prediction.error is not None:
                print(f"cifar100: error: {prediction.error}", file=sys.stderr)
            elif not args.json:
                print(prediction)
        results += chunk
    if args.json:
        print(json.dumps([p.to_json() for p in results], indent=2))
    return 1 if any(p.error is not None for p in results) else 0
