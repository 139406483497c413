"""``cifar100 export``: a trained run as ONNX, safetensors or a model-hub folder, checked
before it ships.

The ONNX file is run in onnxruntime on the first test images of CIFAR-100 and compared with
PyTorch: the command fails unless top-1 predictions agree on at least 99.9% of them. The
safetensors file is loaded back and must give the same logits. ``--format hub`` writes a
folder to upload as it is (model.safetensors, config.json, README.md model card with metrics
measured on the test set); ``predict`` and ``serve`` take it as ``--model``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cifar100.api import export
from cifar100.deploy import exports, hub
from cifar100.recipes.argtypes import positive_int
from cifar100.recipes.shared_flags import add_shared

EXPORT_OPTIONS = ("out", "data_dir", "check_images", "calibrated")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", type=Path, metavar="RUN_DIR", help="run directory or .pt checkpoint")
    p.add_argument(
        "--format",
        choices=["onnx", "safetensors", "all", "hub"],
        default="onnx",
        help="onnx: preprocessing + network; safetensors: weights; all: both; hub: a folder "
        "with model.safetensors, config.json and a README.md model card (default: onnx)",
    )
    add_shared(p, "export", "out", "data_dir")
    p.add_argument(
        "--check-images",
        type=positive_int,
        default=1000,
        metavar="N",
        help="compare with PyTorch on the first N test images (default: 1000)",
    )
    add_shared(p, "export", "calibrated", "json")


def run(args: argparse.Namespace) -> int:
    options = vars(args)
    report = export(args.run, args.format, **{k: options[k] for k in EXPORT_OPTIONS})
    summary = hub.summary if args.format == "hub" else exports.summary
    print(json.dumps(report, indent=2) if args.json else summary(report))
    return 0
