"""Ship a trained model as ONNX (preprocessing + network) or safetensors, with its metadata.

The ONNX graph takes what ``cifar100.data.images.read_image`` gives: float32 RGB in [0, 1],
N x 3 x 32 x 32 with a dynamic batch, and returns logits (N, 100). Resizing to the
network's own input size and mean/std normalisation are inside the graph, so a consumer
only needs the metadata (``metadata_props``) to name the classes.

The safetensors file holds the network's weights (no preprocessing) with the same metadata
as string metadata, plus the resolved config so that the network can be rebuilt.

A calibrated export (``cifar100 export --calibrated``) divides the logits by the
temperature fitted on the validation split: inside the ONNX graph, and on loading for
safetensors; both files name it in their ``temperature`` metadata (1.0: raw logits).

``export_run`` checks every file before it appears: the ONNX file runs in onnxruntime on
the first test images and must agree with PyTorch on 99.9% of top-1 predictions; the
safetensors file is loaded back and must give the same logits.
"""

from __future__ import annotations

import io
import json
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cifar100 import __version__
from cifar100.data.cifar import load_cifar100
from cifar100.data.images import IMAGE_SIZE
from cifar100.data.preprocess import Preprocess
from cifar100.errors import UserError
from cifar100.runs.trained import TrainedModel, checkpoint_path, load_trained
from cifar100.runtime.stopping import interrupted

ONNX_OPSET = 17
INPUT_NAME, OUTPUT_NAME = "images", "logits"
MIN_TOP1_AGREEMENT = 0.999
SUFFIXES = {"onnx": ".onnx", "safetensors": ".safetensors"}


class ExportError(UserError):
    """An export that cannot be written, read back, or does not match PyTorch."""


def model_metadata(trained: TrainedModel, source: str | Path) -> dict[str, str]:
    """Everything a consumer needs besides the weights, as strings (ONNX and safetensors)."""
    p, meta = trained.preprocess, trained.metadata
    config = meta.get("config", {})
    values: dict[str, Any] = {
        "producer": f"cifar100 {__version__}",
        "source_run": str(source),
        "model_name": config.get("model", {}).get("name", ""),
        "class_names": trained.class_names,
        "superclass_names": trained.superclass_names,
        "fine_to_coarse": trained.fine_to_coarse,
        "input_name": INPUT_NAME,
        "input_layout": "NCHW, channels RGB",
        "input_dtype": "float32",
        "input_scaling": "pixel / 255, in [0, 1]",
        "input_size": IMAGE_SIZE,
        "input_resize": "largest centred square, Lanczos to 32x32 (cifar100.data.images)",
        "model_input_size": p.size,
        "mean": p.mean.flatten().tolist(),
        "std": p.std.flatten().tolist(),
        "normalization": "inside the ONNX graph: resize to model_input_size, (x - mean) / std",
        "output": "logits (N, num_classes); softmax gives probabilities",
        # 1.0: raw logits; otherwise the logits are already divided by it (in the graph;
        # for safetensors, load_safetensors applies it) - fitted on the validation split.
        "temperature": trained.temperature,
        "config": config,
        "stage": meta.get("stage"),
        "epoch": meta.get("epoch"),
        "val_top1": (meta.get("val") or {}).get("top1"),
    }
    return {
        k: v if isinstance(v, str) else json.dumps(v) for k, v in values.items() if v is not None
    }


def _write_atomic(data: bytes, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as error:
        Path(tmp).unlink(missing_ok=True)
        raise ExportError(f"{path}: could not write ({error.strerror or error})") from None


@contextmanager
def published_after_check(path: Path) -> Iterator[Path]:
    """Yield a hidden sibling to write and check; it becomes ``path`` only if the block ends
    normally. A failed check or a stop signal leaves no file a user could mistake for a
    verified export."""
    path.parent.mkdir(parents=True, exist_ok=True)
    unchecked = path.with_name(f".{path.name}.unchecked")
    try:
        yield unchecked
        os.replace(unchecked, path)
    except ExportError as error:  # name the file the user asked for, not the hidden one
        raise ExportError(str(error).replace(str(unchecked), str(path))) from None
    finally:
        unchecked.unlink(missing_ok=True)


def export_onnx(classifier: nn.Module, path: str | Path, metadata: dict[str, str]) -> Path:
    """Write ``classifier`` (float [0, 1] (N, 3, 32, 32) -> logits) as ONNX to ``path``."""
    import onnx

    path = Path(path)
    classifier = classifier.eval()
    example = torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        # dynamo=False: the TorchScript exporter needs no onnxscript, and its deprecation
        # notice and the tracer's note on the (fixed) 32x32 input size are expected.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            classifier,
            (example,),
            buffer,
            dynamo=False,
            opset_version=ONNX_OPSET,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        )
    model = onnx.load_from_string(buffer.getvalue())
    model.producer_name, model.producer_version = "cifar100", __version__
    model.doc_string = "CIFAR-100 classifier: preprocessing + network (see metadata_props)"
    onnx.helper.set_model_props(model, metadata)
    onnx.checker.check_model(model, full_check=True)
    _write_atomic(model.SerializeToString(), path)
    return path


class OnnxClassifier:
    """An exported ONNX model in onnxruntime, with the class names from its metadata."""

    def __init__(self, path: str | Path):
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise ExportError(f"{self.path}: ONNX file not found")
        try:
            self.session = ort.InferenceSession(str(self.path), providers=["CPUExecutionProvider"])
        except Exception as error:  # onnxruntime raises its own untyped exceptions
            raise ExportError(
                f"{self.path}: not a readable ONNX model ({str(error).splitlines()[0][:200]})"
            ) from None
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        try:
            self.class_names = json.loads(self.metadata["class_names"])
        except (KeyError, json.JSONDecodeError):
            raise ExportError(
                f"{self.path}: no class_names in its metadata (not exported by 'cifar100 export'?)"
            ) from None
        self.input_name = self.session.get_inputs()[0].name

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """float [0, 1] (N, 3, 32, 32) -> logits (N, num_classes)."""
        array = np.ascontiguousarray(images.numpy(), dtype=np.float32)
        return torch.from_numpy(self.session.run(None, {self.input_name: array})[0])


def batched_logits(fn, images: torch.Tensor, batch_size: int = 250) -> torch.Tensor:
    """Logits for uint8 or float images, ``batch_size`` at a time (bounded memory)."""
    outputs = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size]
            if batch.dtype == torch.uint8:
                batch = batch.float() / 255.0
            outputs.append(fn(batch).float())
    return torch.cat(outputs)


def compare_logits(
    reference: torch.Tensor, candidate: torch.Tensor, labels: torch.Tensor | None = None
) -> dict[str, float]:
    """Max abs logit difference, top-1 agreement and (with labels) both accuracies."""
    result = {
        "images": len(reference),
        "max_abs_logit_diff": float((reference - candidate).abs().max()),
        "top1_agreement": float((reference.argmax(1) == candidate.argmax(1)).float().mean()),
    }
    if labels is not None:
        result["reference_top1"] = float((reference.argmax(1) == labels).float().mean())
        result["candidate_top1"] = float((candidate.argmax(1) == labels).float().mean())
    return result


def check_onnx(
    classifier: nn.Module,
    path: str | Path,
    images: torch.Tensor,
    labels: torch.Tensor | None = None,
) -> dict[str, float]:
    """Run the ONNX file in onnxruntime against PyTorch on ``images``; fail below 99.9%."""
    reference = batched_logits(classifier.eval(), images)
    candidate = batched_logits(OnnxClassifier(path).logits, images)
    result = compare_logits(reference, candidate, labels)
    if result["top1_agreement"] < MIN_TOP1_AGREEMENT:
        raise ExportError(
            f"{path}: onnxruntime agrees with PyTorch on only "
            f"{result['top1_agreement']:.2%} of top-1 predictions "
            f"(need {MIN_TOP1_AGREEMENT:.1%}); max abs logit difference "
            f"{result['max_abs_logit_diff']:.3g}"
        )
    return result


def export_safetensors(trained: TrainedModel, path: str | Path, metadata: dict[str, str]) -> Path:
    """The network's weights (no preprocessing buffers) with ``metadata`` as strings."""
    from safetensors.torch import save

    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in trained.model.state_dict().items()}
    _write_atomic(save(tensors, metadata=metadata), path)
    return path


def load_safetensors(path: str | Path) -> TrainedModel:
    """Rebuild a ``TrainedModel`` from a file written by ``export_safetensors``."""
    from safetensors import SafetensorError, safe_open

    from cifar100.config.schema import from_saved
    from cifar100.models import build_model

    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: safetensors file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
        config = from_saved(json.loads(meta["config"]))
        class_names = json.loads(meta["class_names"])
        model = build_model(config.model, len(class_names))
        model.load_state_dict(tensors)
    except (SafetensorError, OSError, KeyError, ValueError, RuntimeError) as error:
        raise ExportError(
            f"{path}: not a cifar100 safetensors export "
            f"({type(error).__name__}: {str(error)[:200]})"
        ) from None
    preprocess = Preprocess(
        int(meta["model_input_size"]), json.loads(meta["mean"]), json.loads(meta["std"])
    )
    extra = {k: v for k, v in meta.items() if k != "class_names"}
    extra["config_obj"] = config
    return TrainedModel(
        model.eval(),
        preprocess,
        class_names,
        json.loads(meta["superclass_names"]),
        json.loads(meta["fine_to_coarse"]),
        extra,
        float(meta.get("temperature", 1.0)),
    )


def output_paths(run: Path, fmt: str, out: Path | None) -> dict[str, Path]:
    """Where each format goes: ``out`` (its suffix replaced per format for 'all'), else
    beside the checkpoint."""
    formats = ["onnx", "safetensors"] if fmt == "all" else [fmt]
    if out is not None and len(formats) == 1:
        return {fmt: out}
    if out is None:  # beside the checkpoint: RUN_DIR/model.*, or CHECKPOINT.* for a .pt file
        out = run / "model" if run.is_dir() else checkpoint_path(run).with_suffix("")
    return {f: out.with_suffix(SUFFIXES[f]) for f in formats}


def check_images(trained: TrainedModel, data_dir: str | Path | None, count: int):
    """The first ``count`` test images and labels, from ``data_dir`` or the run's data."""
    if count < 1:
        raise ExportError(f"--check-images must be at least 1, got {count}")
    config = trained.metadata.get("config_obj")
    data_dir = data_dir or (config.data.data_dir if config is not None else None)
    test = load_cifar100(data_dir).test
    return test.images[:count], test.labels[:count]


def export_run(
    run: str | Path,
    fmt: str = "onnx",
    out: str | Path | None = None,
    data_dir: str | Path | None = None,
    count: int = 1000,
    calibrated: bool = False,
) -> dict:
    """Export ``run`` and check every file written.

    Args:
        run: run directory or .pt checkpoint.
        fmt: 'onnx' (preprocessing + network), 'safetensors' (weights) or 'all'.
        out: output file (default: RUN/model.onnx, RUN/model.safetensors).
        data_dir: folder holding ``cifar-100-python/`` for the check (default: the run's).
        count: compare with PyTorch on the first ``count`` test images.
        calibrated: divide the logits by the run's fitted temperature.

    Returns:
        ``{"source_run", "temperature", "files": {format: path}, "checks": {format: ...}}``.
    """
    run, out = Path(run), Path(out) if out is not None else None
    trained = load_trained(run, calibrated=calibrated)
    metadata = model_metadata(trained, run)
    paths = output_paths(run, fmt, out)
    images, labels = check_images(trained, data_dir, count)
    classifier = trained.classifier()
    report: dict = {
        "source_run": str(run),
        "temperature": trained.temperature,
        "files": {},
        "checks": {},
    }
    try:
        if "onnx" in paths:
            with published_after_check(paths["onnx"]) as unchecked:
                export_onnx(classifier, unchecked, metadata)
                print(
                    f"checking {paths['onnx']} in onnxruntime on {len(images):,} test images",
                    file=sys.stderr,
                    flush=True,
                )
                report["checks"]["onnx"] = check_onnx(classifier, unchecked, images, labels)
        if "safetensors" in paths:
            with published_after_check(paths["safetensors"]) as unchecked:
                export_safetensors(trained, unchecked, metadata)
                report["checks"]["safetensors"] = check_safetensors(
                    classifier, unchecked, images, labels
                )
    except KeyboardInterrupt as stop:
        raise interrupted(
            stop, "an export file appears only once its check passed; run the same command again"
        ) from None
    report["files"] = {f: str(p) for f, p in paths.items()}
    return report


def check_safetensors(classifier, path: Path, images, labels) -> dict:
    """Load ``path`` back: its logits must equal ``classifier``'s exactly."""
    reloaded = load_safetensors(path).classifier()
    result = compare_logits(
        batched_logits(classifier, images), batched_logits(reloaded, images), labels
    )
    if result["max_abs_logit_diff"] != 0.0:
        raise ExportError(
            f"{path}: reloaded weights give different "
            f"logits (max abs difference {result['max_abs_logit_diff']:.3g})"
        )
    return result


def summary(report: dict) -> str:
    """``export_run``'s report as text: the temperature, then each file and its check."""
    lines = []
    if report["temperature"] != 1.0:
        lines.append(
            f"calibrated: logits divided by T = {report['temperature']:.4f} (fitted "
            "on the validation split by 'cifar100 evaluate')"
        )
    for fmt, path in report["files"].items():
        check = report["checks"][fmt]
        lines += [
            f"{fmt}: {path}",
            f"  checked on {check['images']} test images: max abs logit difference "
            f"{check['max_abs_logit_diff']:.2e}, top-1 agreement "
            f"{check['top1_agreement']:.2%} (top-1 accuracy PyTorch "
            f"{check['reference_top1']:.2%}, {fmt} {check['candidate_top1']:.2%})",
        ]
    return "\n".join(lines)
