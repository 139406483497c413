"""What the demo page shows, without the page: which model to serve, the header that says
what it is, the answer for one uploaded file, and a few CIFAR-100 test images as examples.

No Gradio here (``cifar100.deploy.demo`` is the page), so all of it is tested, and importable,
without the ``demo`` extra. Everything goes through what the public API exports (``load_model``,
``read_image``, the ``Classifier``), as any user's own page would.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from cifar100.data.cifar import load_names, load_split, resolve_data_dir
from cifar100.data.images import ImageError, read_image
from cifar100.deploy.classifier import Classifier
from cifar100.deploy.hub import is_hub_folder, read_hub_config, run_folder
from cifar100.errors import UserError
from cifar100.records.record import RecordError, make_record
from cifar100.records.table import table_row

TOP = 5
SEEN_SIZE = 256  # the 32x32 input shown 8x larger, nearest neighbour: each pixel a sharp square
# Read by gradio and huggingface_hub (some at import): no usage statistics, no version
# check, no hub calls, no share tunnel. The page must work with no network at all.
OFFLINE_ENV = {
    "GRADIO_ANALYTICS_ENABLED": "False",
    "GRADIO_SHARE": "False",
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
}
TRAIN_HINT = (
    "train one with 'cifar100 train --preset quick' (a few minutes on a CPU), or pass "
    "--model RUN_DIR|FILE|FOLDER"
)


class NoModelError(UserError):
    """Nothing to serve: no --model, and no finished run under the runs folder."""


@dataclass
class Answer:
    """One file's answer: the ``top`` classes with probabilities, the top class's
    superclass, and ``seen`` (the 32x32 input, enlarged); or only the ``error``."""

    name: str
    top: list[tuple[str, float]] = field(default_factory=list)
    superclass: str | None = None
    seen: np.ndarray | None = None  # (SEEN_SIZE, SEEN_SIZE, 3) uint8
    error: str | None = None


def best_run(runs_dir: str | Path = "runs") -> tuple[Path, float, int]:
    """The finished run under ``runs_dir`` with the best validation top-1 (never the test
    set: choosing on it would make its number optimistic), that top-1, and how many
    finished runs there were."""
    finished = []
    for results in sorted(Path(runs_dir).glob("*/results.json")):
        run = results.parent
        try:
            val_top1 = float(json.loads(results.read_text())["val_top1"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # unreadable results: not a run to offer
        if (run / "checkpoints" / "best.pt").is_file():
            finished.append((val_top1, run))
    if not finished:
        raise NoModelError(f"no trained run under {runs_dir}/: {TRAIN_HINT}")
    val_top1, run = max(finished, key=lambda item: item[0])
    return run, val_top1, len(finished)


def choose_model(model: str | Path | None, runs_dir: str | Path = "runs") -> tuple[Path, str]:
    """``model``, or the best run under ``runs_dir``; and a line saying which and why."""
    if model is not None:
        return Path(model), f"serving {model}"
    run, val_top1, count = best_run(runs_dir)
    return run, (
        f"serving {run}: the best validation top-1 ({val_top1:.2%}) of {count} finished "
        f"run{'s' if count != 1 else ''} under {runs_dir}/ (choose another with --model)"
    )


def training_record(path: Path, classifier: Classifier) -> dict[str, Any] | None:
    """A run record (``cifar100.records.record``) for whatever ``path`` is, if one can be found:
    the run itself, the run behind a checkpoint or exported file, or a hub folder's."""
    if is_hub_folder(path):
        config = read_hub_config(path)
        metrics = config["metrics"]
        return {  # the folder's own measurement: its weights, no TTA
            **config.get("training", {}),
            "model": config.get("architecture", ""),
            "test_top1": metrics["top1"],
            "test_top5": metrics["top5"],
            "tta_flip": False,
        }
    source = classifier.metadata.get("source_run")  # an exported file names its run
    run = Path(source) if path.suffix in (".onnx", ".safetensors") and source else path
    folder = run_folder(run) if run.exists() else None
    if folder is None or not (folder / "results.json").is_file():
        return None
    try:
        return make_record(folder)
    except RecordError:
        return None


def header(path: Path, classifier: Classifier) -> str:
    """The page's header (Markdown): the model's name, test accuracy and training record."""
    record = training_record(path, classifier)
    if record is None:
        return (
            f"## CIFAR-100 classifier: {path.name}\n\n"
            "Test accuracy: not recorded with this file. "
            f"{_validation(classifier)}Served from `{path}`."
        )
    name, top1, top5, params, minutes, hardware, date, command = table_row(record)
    model = record.get("model") or ""
    title = f"## CIFAR-100 classifier: {name}" + (f" ({model})" if model not in ("", name) else "")
    facts = [f"Test accuracy **{top1}**", f"top-5 {top5}", f"{params} parameters" if params else ""]
    trained = [
        f"{minutes} on {hardware}" if minutes else "",
        date,
        f"`{command}`" if command else "",
    ]
    lines = [
        " · ".join(f for f in facts if f),
        "Training record: " + (" · ".join(t for t in trained if t) or "not kept"),
        f"Served from `{path}`.",
    ]
    return title + "\n\n" + "  \n".join(lines)  # two spaces: a Markdown line break


def _validation(classifier: Classifier) -> str:
    meta = classifier.metadata
    value = (meta.get("val") or {}).get("top1") if "val" in meta else meta.get("val_top1")
    return f"Validation top-1: {float(value):.2%}. " if value is not None else ""


def answer(classifier: Classifier, path: str | Path, name: str | None = None) -> Answer:
    """The top classes of the image file at ``path`` (shown to the user as ``name``); a file
    that cannot be read gets a one-line ``error`` that names ``name``, not a server path."""
    name = name or Path(path).name
    try:
        image = read_image(path)  # (3, 32, 32) float in [0, 1]: exactly what the model gets
    except ImageError as error:
        return Answer(name, error=str(error).replace(str(path), name))
    (prediction,) = classifier.predict(image[None], TOP)
    return Answer(name, prediction.top, classifier.superclass(prediction.top[0][0]), enlarge(image))


def enlarge(image: torch.Tensor, size: int = SEEN_SIZE) -> np.ndarray:
    """(3, 32, 32) float -> (size, size, 3) uint8, nearest neighbour: a browser would blur
    a 32-pixel image it scales up, hiding how coarse the model's view is."""
    pixels = (image.permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8)
    return np.asarray(Image.fromarray(pixels).resize((size, size), Image.Resampling.NEAREST))


def example_images(classifier: Classifier, folder: Path, count: int = 8) -> list[Path]:
    """The first test image of each of ``count`` classes, as PNG files in ``folder`` named
    for their true class; none when no local CIFAR-100 with the model's classes is found
    (the page never downloads)."""
    config = classifier.metadata.get("config_obj")
    data_dir = config.data.data_dir if config is not None else None
    try:
        source = resolve_data_dir(data_dir, download=False) / "cifar-100-python"
        if load_names(source / "meta")[0] != classifier.class_names:
            return []
        test = load_split(source / "test")
    except UserError:
        return []
    paths, seen = [], set()
    for image, label in zip(test.images, test.labels.tolist(), strict=True):
        if label in seen:
            continue
        seen.add(label)
        path = folder / f"{classifier.class_names[label]}.png"
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(path)
        paths.append(path)
        if len(paths) == count:
            break
    return paths
