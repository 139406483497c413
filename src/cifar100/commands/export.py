"""``cifar100 export``: a trained run as ONNX and/or safetensors, checked before it ships.

The ONNX file is run in onnxruntime on the first test images of CIFAR-100 and compared with
PyTorch: the command fails unless top-1 predictions agree on at least 99.9% of them. The
safetensors file is loaded back and must give the same logits.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cifar100.classifier import TrainedModel, checkpoint_path, load_trained
from cifar100.commands.argtypes import positive_int
from cifar100.data import load_cifar100
from cifar100.export import (
    ExportError,
    batched_logits,
    check_onnx,
    compare_logits,
    export_onnx,
    export_safetensors,
    load_safetensors,
    model_metadata,
    published_after_check,
)
from cifar100.stopping import interrupted

SUFFIXES = {"onnx": ".onnx", "safetensors": ".safetensors"}


def register(subparsers) -> None:
    p = subparsers.add_parser("export", help="export a trained run to ONNX / safetensors",
                              description=__doc__)
    p.add_argument("run", type=Path, metavar="RUN_DIR", help="run directory or .pt checkpoint")
    p.add_argument("--format", choices=["onnx", "safetensors", "all"], default="onnx",
                   help="onnx: preprocessing + network; safetensors: weights; all: both "
                   "(default: onnx)")
    p.add_argument("--out", type=Path, metavar="FILE",
                   help="output file (with --format all, its suffix is replaced per format); "
                   "default: RUN_DIR/model.onnx, RUN_DIR/model.safetensors")
    p.add_argument("--data-dir", help="folder holding cifar-100-python/ for the check "
                   "(default: the run's, else $CIFAR100_DATA, the cache or a download)")
    p.add_argument("--check-images", type=positive_int, default=1000, metavar="N",
                   help="compare with PyTorch on the first N test images (default: 1000)")
    p.add_argument("--calibrated", action="store_true",
                   help="divide the logits by the temperature 'cifar100 evaluate' fitted on "
                   "the validation split (RUN/calibration.json)")
    p.add_argument("--json", action="store_true", help="print the files and checks as JSON")
    p.set_defaults(func=run)


def output_paths(run: Path, fmt: str, out: Path | None) -> dict[str, Path]:
    formats = ["onnx", "safetensors"] if fmt == "all" else [fmt]
    if out is not None and len(formats) == 1:
        return {fmt: out}
    if out is None:  # beside the checkpoint: RUN_DIR/model.*, or CHECKPOINT.* for a .pt file
        out = run / "model" if run.is_dir() else checkpoint_path(run).with_suffix("")
    return {f: out.with_suffix(SUFFIXES[f]) for f in formats}


def check_images(trained: TrainedModel, data_dir: str | None, count: int):
    if count < 1:
        raise ExportError(f"--check-images must be at least 1, got {count}")
    config = trained.metadata.get("config_obj")
    data_dir = data_dir or (config.data.data_dir if config is not None else None)
    test = load_cifar100(data_dir).test
    return test.images[:count], test.labels[:count]


def export_run(run: Path, fmt: str = "onnx", out: Path | None = None,
               data_dir: str | None = None, count: int = 1000,
               calibrated: bool = False) -> dict:
    """Export ``run`` and check every file written; returns paths and check results."""
    trained = load_trained(run, calibrated=calibrated)
    metadata = model_metadata(trained, run)
    paths = output_paths(run, fmt, out)
    images, labels = check_images(trained, data_dir, count)
    classifier = trained.classifier()
    report: dict = {"source_run": str(run), "temperature": trained.temperature, "files": {},
                    "checks": {}}
    try:
        if "onnx" in paths:
            with published_after_check(paths["onnx"]) as unchecked:
                export_onnx(classifier, unchecked, metadata)
                print(f"checking {paths['onnx']} in onnxruntime on {len(images):,} test images",
                      file=sys.stderr, flush=True)
                report["checks"]["onnx"] = check_onnx(classifier, unchecked, images, labels)
        if "safetensors" in paths:
            with published_after_check(paths["safetensors"]) as unchecked:
                export_safetensors(trained, unchecked, metadata)
                report["checks"]["safetensors"] = check_safetensors(classifier, unchecked,
                                                                    images, labels)
    except KeyboardInterrupt as stop:
        raise interrupted(stop, "an export file appears only once its check passed; "
                          "run the same command again") from None
    report["files"] = {f: str(p) for f, p in paths.items()}
    return report


def check_safetensors(classifier, path: Path, images, labels) -> dict:
    reloaded = load_safetensors(path).classifier()
    result = compare_logits(batched_logits(classifier, images),
                            batched_logits(reloaded, images), labels)
    if result["max_abs_logit_diff"] != 0.0:
        raise ExportError(f"{path}: reloaded weights give different "
                          f"logits (max abs difference {result['max_abs_logit_diff']:.3g})")
    return result


def run(args: argparse.Namespace) -> int:
    report = export_run(args.run, args.format, args.out, args.data_dir, args.check_images,
                        args.calibrated)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    if report["temperature"] != 1.0:
        print(f"calibrated: logits divided by T = {report['temperature']:.4f} (fitted on the "
              "validation split by 'cifar100 evaluate')")
    for fmt, path in report["files"].items():
        check = report["checks"][fmt]
        print(f"{fmt}: {path}")
        print(f"  checked on {check['images']} test images: max abs logit difference "
              f"{check['max_abs_logit_diff']:.2e}, top-1 agreement {check['top1_agreement']:.2%}"
              f" (top-1 accuracy PyTorch {check['reference_top1']:.2%}, "
              f"{fmt} {check['candidate_top1']:.2%})")
    return 0
