"""A trained run as a folder a model hub takes as it is (``cifar100 export --format hub``).

    model.safetensors   the network's weights, with the same metadata as ``--format safetensors``
    config.json         architecture, classes (id2label), preprocessing, metrics, training record
    README.md           the model card (``cifar100.deploy.model_card``), written from the run record

``load_hub`` reads both files and never lets ``config.json`` be silently ignored. What only
names things is taken from it: the class names (``id2label``; ``label2id`` must agree) and
the superclass names, so a class renamed there answers under its new name. What the
weights were trained and measured with (``architecture``, the whole ``config``, the
preprocessing, the temperature, the class count, each class's superclass) is checked
against the weights' own metadata: a folder whose ``config.json`` disagrees is refused
with one line naming the file and the field.

The card's metrics are measured here, on the whole test set, with the exported weights
read back from the folder and without test-time augmentation: what ``predict`` and
``serve`` will do with this folder, rather than the run's own (possibly flip-TTA) numbers.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np

from cifar100 import __version__
from cifar100.data.cifar import Split, load_names, load_split, resolve_data_dir
from cifar100.data.images import IMAGE_SIZE
from cifar100.deploy.exports import (
    batched_logits,
    check_safetensors,
    export_safetensors,
    load_safetensors,
    model_metadata,
)
from cifar100.deploy.model_card import render_card
from cifar100.errors import UserError
from cifar100.evaluation.metrics import calibration, nll, softmax, topk_accuracy
from cifar100.models import REGISTRY, model_spec
from cifar100.records.record import RecordError, make_record
from cifar100.runs.trained import TrainedModel, load_trained
from cifar100.runtime.stopping import interrupted

WEIGHTS, CONFIG, CARD = "model.safetensors", "config.json", "README.md"
HUB_FORMAT = "cifar100-hub/1"  # what load_hub accepts; bump it if the layout changes
_MISSING = object()  # a field config.json does not have


class HubError(UserError):
    """A model folder that cannot be written or read; the message names it."""


def is_hub_folder(path: str | Path) -> bool:
    """Whether ``path`` looks like a folder ``export_hub`` wrote (run folders have no
    config.json, so the two never mix)."""
    path = Path(path)
    return path.is_dir() and (path / CONFIG).is_file() and (path / WEIGHTS).is_file()


def read_hub_config(folder: str | Path) -> dict[str, Any]:
    """The folder's config.json, checked to be one ``export_hub`` wrote."""
    path = Path(folder) / CONFIG
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise HubError(f"{path}: not readable JSON ({type(error).__name__})") from None
    if not isinstance(config, dict) or config.get("format") != HUB_FORMAT:
        raise HubError(f"{path}: not a cifar100 model folder (format is not {HUB_FORMAT!r})")
    return config


def load_hub(folder: str | Path) -> TrainedModel:
    """The model in a folder ``export_hub`` wrote, ready for ``Classifier``: the weights
    with the names ``config.json`` gives, once it is checked to agree with them."""
    config = read_hub_config(folder)
    trained = load_safetensors(Path(folder) / WEIGHTS)
    return _agreeing(config, trained, Path(folder) / CONFIG)


def _agreeing(config: dict[str, Any], trained: TrainedModel, path: Path) -> TrainedModel:
    """``trained`` named as ``config`` (config.json) says, or a ``HubError`` naming the
    first field of ``config`` that the weights disagree with."""

    def refuse(field: str, why: str) -> HubError:
        return HubError(f"{path}: {field} {why}")

    def same(field: str, stored: Any) -> None:
        if field in config and not _equal(config[field], stored):
            raise refuse(field, f"{_short(config[field])} does not match the weights ({stored})")

    if config.get("weights", WEIGHTS) != WEIGHTS:
        raise refuse("weights", f"{config['weights']!r} is not {WEIGHTS!r}, the file read")
    trained_as = trained.metadata["config_obj"].model.name
    architecture = config.get("architecture", _MISSING)
    if not isinstance(architecture, str) or architecture not in REGISTRY:
        raise refuse(
            "architecture",
            f"{_short(architecture)} is not a cifar100 model "
            f"(the weights were trained as {trained_as!r})",
        )
    if architecture != trained_as:
        raise refuse(
            "architecture",
            f"{architecture!r} does not match the weights (trained as {trained_as!r})",
        )
    stored_config = json.loads(trained.metadata.get("config", "{}"))
    if "config" in config:
        field = _first_difference(config["config"], stored_config, "config")
        if field is not None:
            keys = field.split(".")[1:]
            shown, stored = _at(config["config"], keys), _at(stored_config, keys)
            why = f"trained as {stored!r}" if field == "config.model.name" else _short(stored)
            raise refuse(field, f"{_short(shown)} does not match the weights ({why})")
    count = len(trained.class_names)
    same("num_classes", count)
    same("temperature", trained.temperature)
    preprocessing = config.get("preprocessing", {})
    p = trained.preprocess
    stored_preprocessing = {
        "resize": {"size": IMAGE_SIZE, "filter": "lanczos"},
        "model_input_size": p.size,
        "mean": p.mean.flatten().tolist(),
        "std": p.std.flatten().tolist(),
    }
    if not isinstance(preprocessing, dict):
        raise refuse("preprocessing", "is not a JSON object")
    for key, stored in stored_preprocessing.items():
        if key in preprocessing and not _equal(preprocessing[key], stored):
            raise refuse(
                f"preprocessing.{key}",
                f"{_short(preprocessing[key])} does not match the weights ({stored})",
            )
    names = _labels(config.get("id2label"), count, refuse)
    if "label2id" in config and config["label2id"] != {name: i for i, name in enumerate(names)}:
        raise refuse("label2id", "does not match id2label (each name of id2label, to its id)")
    superclasses = config.get("superclass_names", trained.superclass_names)
    if (
        not isinstance(superclasses, list)
        or len(superclasses) != len(trained.superclass_names)
        or not _distinct_names(superclasses)
    ):
        raise refuse(
            "superclass_names",
            f"must list {len(trained.superclass_names)} distinct names, as the weights do",
        )
    fine_to_coarse = config.get("fine_to_coarse", trained.fine_to_coarse)
    if fine_to_coarse != trained.fine_to_coarse:
        raise refuse("fine_to_coarse", "does not match the weights' superclass of each class")
    return dataclasses.replace(trained, class_names=names, superclass_names=superclasses)


def _labels(id2label: Any, count: int, refuse) -> list[str]:
    """The class names of config.json's ``id2label``: ids "0" to count - 1, each once."""
    expected = [str(i) for i in range(count)]
    if not isinstance(id2label, dict) or sorted(id2label, key=_as_int) != expected:
        raise refuse(
            "id2label", f"must map the ids 0 to {count - 1} (one per output of the weights)"
        )
    names = [id2label[i] for i in expected]
    if not _distinct_names(names):
        raise refuse("id2label", "must give each class a distinct, non-empty name")
    return names


def _as_int(key: str) -> tuple[int, str]:
    return (int(key), key) if key.isdigit() else (-1, key)


def _distinct_names(names: list[Any]) -> bool:
    return all(isinstance(n, str) and n.strip() for n in names) and len(set(names)) == len(names)


def _equal(given: Any, stored: Any) -> bool:
    """JSON values equal, floats to within rounding (a reformatted file still agrees)."""
    if isinstance(stored, float) or isinstance(given, float):
        return (
            isinstance(given, (int, float))
            and not isinstance(given, bool)
            and isinstance(stored, (int, float))
            and math.isclose(given, stored, rel_tol=1e-6, abs_tol=1e-12)
        )
    if isinstance(stored, dict):
        return (
            isinstance(given, dict)
            and given.keys() == stored.keys()
            and all(_equal(given[k], stored[k]) for k in stored)
        )
    if isinstance(stored, list):
        return (
            isinstance(given, list)
            and len(given) == len(stored)
            and all(_equal(a, b) for a, b in zip(given, stored, strict=True))
        )
    return type(given) is type(stored) and given == stored


def _first_difference(given: Any, stored: Any, field: str) -> str | None:
    """The dotted name of the first field where ``given`` and ``stored`` differ."""
    if isinstance(stored, dict) and isinstance(given, dict):
        for key in [*stored, *(k for k in given if k not in stored)]:
            if key not in given or key not in stored:
                return f"{field}.{key}"
            inner = _first_difference(given[key], stored[key], f"{field}.{key}")
            if inner is not None:
                return inner
        return None
    return None if _equal(given, stored) else field


def _at(value: Any, keys: list[str]) -> Any:
    for key in keys:
        value = value.get(key, _MISSING) if isinstance(value, dict) else _MISSING
    return value


def _short(value: Any) -> str:
    text = "(missing)" if value is _MISSING else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def run_folder(run: Path) -> Path | None:
    """The run directory behind ``run`` (a run, or RUN/checkpoints/NAME.pt), if any."""
    if run.is_dir():
        return run
    parent = run.parent.parent
    return parent if run.parent.name == "checkpoints" and (parent / "run.json").is_file() else None


def training_record(run: Path) -> dict[str, Any] | None:
    """The run's record (``cifar100.records.record``), or None for a checkpoint without its run."""
    folder = run_folder(run)
    if folder is None or not (folder / "results.json").is_file():
        return None  # a checkpoint alone, or a run still training
    try:
        return make_record(folder)
    except RecordError:
        return None


def test_split(trained: TrainedModel, data_dir: str | Path | None) -> Split:
    """The local CIFAR-100 test split (never downloaded: an export should not need the
    network), checked to have the model's classes."""
    folder = resolve_data_dir(data_dir, download=False) / "cifar-100-python"
    class_names, _ = load_names(folder / "meta")
    if class_names != trained.class_names:
        raise HubError(f"{folder}: its class names differ from the model's")
    return load_split(folder / "test")


def test_metrics(trained: TrainedModel, test: Split) -> dict[str, Any]:
    """top-1, top-5, superclass accuracy, ECE and NLL on ``test`` (one view, no TTA)."""
    print(f"measuring on {len(test):,} test images", file=sys.stderr, flush=True)
    probs = softmax(batched_logits(trained.classifier(), test.images)).astype(np.float64)
    labels = test.labels.numpy()
    coarse = np.asarray(trained.fine_to_coarse)
    return {
        "images": len(labels),
        "top1": topk_accuracy(probs, labels, 1),
        "top5": topk_accuracy(probs, labels, 5),
        "superclass_accuracy": float((coarse[probs.argmax(1)] == coarse[labels]).mean()),
        "ece": calibration(probs, labels)["ece"],
        "nll": nll(probs, labels),
        "tta_flip": False,
        "temperature": trained.temperature,
    }


def hub_config(
    trained: TrainedModel, metrics: dict[str, Any], record: dict[str, Any] | None
) -> dict[str, Any]:
    """config.json: what the model is, what it takes, how well it does, where it came from."""
    config = trained.metadata.get("config", {})
    p = trained.preprocess
    names = trained.class_names
    architecture = config.get("model", {}).get("name", "")
    return {
        "format": HUB_FORMAT,
        "library_name": "cifar100",
        "library_version": __version__,
        "architecture": architecture,
        "plan": model_spec(architecture).plan,  # "transfer": fine-tuned from ImageNet weights
        "weights": WEIGHTS,
        "num_classes": len(names),
        "id2label": {str(i): name for i, name in enumerate(names)},
        "label2id": {name: i for i, name in enumerate(names)},
        "superclass_names": trained.superclass_names,
        "fine_to_coarse": trained.fine_to_coarse,
        "preprocessing": {
            "image": "any photo, read as RGB (alpha composited on white)",
            "crop": "largest centred square",
            "resize": {"size": IMAGE_SIZE, "filter": "lanczos"},
            "scale": "pixel / 255, float32 in [0, 1], NCHW",
            "model_input_size": p.size,
            "model_resize": "bilinear (antialiased when shrinking), inside the model",
            "mean": p.mean.flatten().tolist(),
            "std": p.std.flatten().tolist(),
        },
        "temperature": trained.temperature,
        "metrics": metrics,
        "training": _training(record, trained),
        "config": config,
    }


def _training(record: dict[str, Any] | None, trained: TrainedModel) -> dict[str, Any]:
    meta = trained.metadata
    base = {"best_stage": meta.get("stage"), "best_epoch": meta.get("epoch")}
    if record is None:
        return base
    keys = ("name", "test_top1", "test_top5", "val_top1", "tta_flip", "tta_translate")
    keys += (
        "parameters",
        "train_minutes",
        "train_images",
        "commit",
        "started",
        "command",
        "hardware",
    )
    return {**base, **{k: record[k] for k in keys if k in record}}


def export_hub(
    run: str | Path,
    out: str | Path | None = None,
    data_dir: str | Path | None = None,
    count: int = 1000,
    calibrated: bool = False,
) -> dict[str, Any]:
    """Write ``run`` as a model folder (default RUN/hub) and check it before it appears.

    Args:
        run: run directory or .pt checkpoint.
        out: the folder; replaced if it holds an earlier export, refused if it holds others.
        data_dir: folder holding ``cifar-100-python/`` (default: the run's); never downloads.
        count: the reloaded weights must give the same logits on the first ``count`` test
            images (the metrics use all of them).
        calibrated: divide the logits by the run's fitted temperature.

    Returns:
        ``{"folder", "files", "metrics", "check"}``.
    """
    run = Path(run)
    trained = load_trained(run, calibrated=calibrated)
    config_obj = trained.metadata.get("config_obj")
    data_dir = data_dir or (config_obj.data.data_dir if config_obj is not None else None)
    out = Path(out) if out is not None else default_folder(run)
    _check_target(out)
    staging = out.with_name(f".{out.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        report = _write_folder(trained, run, staging, data_dir, count)
        shutil.rmtree(out, ignore_errors=True)
        staging.rename(out)
    except KeyboardInterrupt as stop:
        raise interrupted(
            stop, "the folder appears only once it is checked; run it again"
        ) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {"folder": str(out), "files": [str(out / f) for f in (WEIGHTS, CONFIG, CARD)], **report}


def default_folder(run: Path) -> Path:
    """RUN/hub for a run (or its checkpoint), CHECKPOINT-hub beside a lone .pt file."""
    folder = run_folder(run)
    return folder / "hub" if folder is not None else run.with_name(f"{run.stem}-hub")


def _check_target(out: Path) -> None:
    if out.exists() and not (is_hub_folder(out) or (out.is_dir() and not any(out.iterdir()))):
        raise HubError(f"{out}: exists and is not a cifar100 model folder; choose another --out")


def _write_folder(
    trained: TrainedModel, run: Path, folder: Path, data_dir: Any, count: int
) -> dict[str, Any]:
    try:
        folder.mkdir(parents=True)
    except OSError as error:
        raise HubError(f"{folder}: cannot create ({error.strerror or error})") from None
    test = test_split(trained, data_dir)
    weights = export_safetensors(trained, folder / WEIGHTS, model_metadata(trained, run))
    reloaded = load_safetensors(weights)
    metrics = test_metrics(reloaded, test)
    check = check_safetensors(
        trained.classifier(), weights, test.images[:count], test.labels[:count]
    )
    config = hub_config(trained, metrics, training_record(run))
    (folder / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    (folder / CARD).write_text(render_card(config))
    return {"metrics": metrics, "check": check}


def summary(report: dict[str, Any]) -> str:
    """``export_hub``'s report as text: the folder, its files and the measured metrics."""
    m = report["metrics"]
    return "\n".join(
        [
            f"hub: {report['folder']}",
            *(f"  {Path(f).name}" for f in report["files"]),
            f"  test set ({m['images']:,} images, no TTA): top-1 {m['top1']:.2%}, top-5 "
            f"{m['top5']:.2%}, superclass {m['superclass_accuracy']:.2%}, ECE {m['ece']:.3f}",
            f"  weights read back: same logits on {report['check']['images']:,} test images",
        ]
    )
