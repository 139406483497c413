"""CIFAR-100: find it (local folder, cache, download), load it, validate it, split it.

Images stay uint8 tensors of shape (N, 3, 32, 32): 150 MB for the training set instead of
600 MB as float32, and uint8 is faster to move and to augment in batches.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cifar100.errors import UserError
from cifar100.runtime import distributed
from cifar100.runtime.download import DownloadError, extract_tar, fetch
from cifar100.runtime.stopping import interrupted

URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
FOLDER = "cifar-100-python"
NUM_CLASSES = 100
NUM_SUPERCLASSES = 20
MEAN = (0.5071, 0.4865, 0.4409)  # training-set channel statistics
STD = (0.2673, 0.2564, 0.2762)


class DataError(UserError):
    """Data that cannot be found, read or trusted; the message names the file."""


@dataclass(frozen=True)
class Split:
    images: torch.Tensor  # (N, 3, 32, 32) uint8
    labels: torch.Tensor  # (N,) int64 fine labels
    coarse_labels: torch.Tensor  # (N,) int64 superclass labels

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: torch.Tensor) -> Split:
        return Split(self.images[indices], self.labels[indices], self.coarse_labels[indices])

    def to(self, device: torch.device | str) -> Split:
        """The split on ``device`` (itself when it is there already)."""
        if self.images.device == torch.device(device):
            return self
        return Split(self.images.to(device), self.labels.to(device), self.coarse_labels.to(device))


@dataclass(frozen=True)
class Cifar100:
    train: Split
    test: Split
    class_names: list[str]
    superclass_names: list[str]
    source: Path

    def fine_to_coarse(self) -> torch.Tensor:
        """(100,) superclass of each fine class, read off the training labels."""
        mapping = torch.full((NUM_CLASSES,), -1, dtype=torch.long)
        mapping[self.train.labels] = self.train.coarse_labels
        return mapping


def default_cache_dir() -> Path:
    base = os.environ.get("CIFAR100_CACHE") or os.environ.get("XDG_CACHE_HOME")
    return Path(base) / "cifar100" if base else Path.home() / ".cache" / "cifar100"


def resolve_data_dir(data_dir: str | Path | None = None, download: bool = True) -> Path:
    """Folder holding ``cifar-100-python/``: explicit path or $CIFAR100_DATA, cache, download."""
    explicit = data_dir or os.environ.get("CIFAR100_DATA")
    if explicit:
        root = Path(explicit).expanduser()
        if (root / FOLDER).is_dir():
            return root
        if root.name == FOLDER and root.is_dir():
            return root.parent
        raise DataError(f"{root}: no {FOLDER}/ folder here (from --data-dir or CIFAR100_DATA)")
    cache = default_cache_dir()
    if (cache / FOLDER / "meta").is_file():
        return cache
    if download:
        try:
            _download(cache)
            return cache
        except DownloadError as error:
            raise DataError(_no_source_message(cache, error)) from None
    raise DataError(_no_source_message(cache, None))


def _download(cache: Path) -> None:
    """Fetch, verify and unpack into ``cache``; the archive never outlives this call.

    ``CIFAR100_URL`` names a mirror of the same archive (its md5 must still match).
    """
    archive, url = cache / "cifar-100-python.tar.gz", os.environ.get("CIFAR100_URL") or URL
    try:
        fetch(url, archive, md5=MD5)
        extract_tar(archive, cache)
    except KeyboardInterrupt as stop:  # SIGINT/SIGTERM: fetch and extract_tar cleaned up
        raise interrupted(
            stop, "the partial download was removed; the next run downloads again"
        ) from None
    finally:
        archive.unlink(missing_ok=True)
    if not (cache / FOLDER / "meta").is_file():
        raise DownloadError(f"{URL}: the archive holds no {FOLDER}/meta")


def _no_source_message(cache: Path, error: Exception | None) -> str:
    why = f" The download failed: {error}." if error else ""
    return (
        "CIFAR-100 not found. Provide it in one of three ways: pass --data-dir DIR (or set "
        f"CIFAR100_DATA=DIR) where DIR holds {FOLDER}/; put {FOLDER}/ in the cache folder "
        f"{cache}; or let the tool download {URL} (needs internet, md5 {MD5}).{why}"
    )


class _RefusedGlobal(pickle.UnpicklingError):
    pass


class _ArrayUnpickler(pickle.Unpickler):
    """Builds only dicts, lists, strings and numpy arrays: a pickle cannot run code here."""

    ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise _RefusedGlobal(f"refused to build {module}.{name}")
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            entry = _ArrayUnpickler(f, encoding="latin1").load()
    except FileNotFoundError:
        raise DataError(f"{path}: file missing") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder, expected a pickle file") from None
    except _RefusedGlobal as error:
        raise DataError(f"{path}: not a CIFAR-100 pickle ({error})") from None
    except Exception as error:  # pickle raises many types on corrupt input
        raise DataError(f"{path}: unreadable or truncated ({type(error).__name__})") from None
    if not isinstance(entry, dict):
        raise DataError(f"{path}: expected a dict, found {type(entry).__name__}")
    return entry


def load_split(path: str | Path, expected: int | None = None) -> Split:
    """Read and validate one pickle (``train`` or ``test``)."""
    path = Path(path)
    entry = _unpickle(path)
    for key in ("data", "fine_labels", "coarse_labels"):
        if key not in entry:
            raise DataError(f"{path}: missing key '{key}'")
    data = entry["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        raise DataError(f"{path}: 'data' must be a 2-D uint8 array")
    rows = expected if expected is not None else "N"
    if data.shape[1] != 3 * 32 * 32 or (expected is not None and data.shape[0] != expected):
        raise DataError(f"{path}: 'data' has shape {data.shape}, expected ({rows}, 3072)")
    if len(data) == 0:
        raise DataError(f"{path}: 'data' holds no images")
    fine = _labels(path, entry["fine_labels"], len(data), NUM_CLASSES, "fine_labels")
    coarse = _labels(path, entry["coarse_labels"], len(data), NUM_SUPERCLASSES, "coarse_labels")
    counts = np.bincount(fine, minlength=NUM_CLASSES)
    if counts.min() == 0 or counts.min() != counts.max():
        raise DataError(f"{path}: classes are unbalanced ({counts.min()}..{counts.max()} images)")
    if len(np.unique(fine * NUM_SUPERCLASSES + coarse)) != NUM_CLASSES:
        raise DataError(
            f"{path}: 'coarse_labels' disagree with 'fine_labels' (one superclass "
            "per class expected)"
        )
    images = torch.from_numpy(data).view(-1, 3, 32, 32)  # rows are R, G, B planes
    return Split(images, torch.from_numpy(fine), torch.from_numpy(coarse))


def _labels(path: Path, raw, n: int, num: int, key: str) -> np.ndarray:
    try:
        labels = np.asarray(raw)
    except (ValueError, TypeError):  # ragged or odd objects
        labels = np.asarray([], dtype=object)
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path}: '{key}' must hold {n} integers")
    if labels.min() < 0 or labels.max() >= num:
        raise DataError(f"{path}: '{key}' outside 0..{num - 1}")
    return labels.astype(np.int64)


def load_names(path: Path) -> tuple[list[str], list[str]]:
    meta = _unpickle(path)
    fine, coarse = meta.get("fine_label_names"), meta.get("coarse_label_names")
    for key, names, num in (
        ("fine_label_names", fine, NUM_CLASSES),
        ("coarse_label_names", coarse, NUM_SUPERCLASSES),
    ):
        if not (
            isinstance(names, list) and len(names) == num and all(isinstance(n, str) for n in names)
        ):
            raise DataError(f"{path}: '{key}' must list {num} names")
    return fine, coarse


def load_cifar100(data_dir: str | Path | None = None, download: bool = True) -> Cifar100:
    """The whole data set, validated by structure (a local copy may differ in md5).

    Under torchrun rank 0 alone downloads and extracts (one process per machine at most);
    the others wait for it, then read the cache.
    """
    root = distributed.main_first(lambda allowed: resolve_data_dir(data_dir, download and allowed))
    folder = root / FOLDER
    fine_names, coarse_names = load_names(folder / "meta")
    train = load_split(folder / "train")
    test = load_split(folder / "test")
    return Cifar100(train, test, fine_names, coarse_names, folder)


def _shuffled_members(labels: torch.Tensor, seed: int) -> list[np.ndarray]:
    """Per class, its indices in ascending order, then shuffled by a torch permutation.

    The index work is numpy: torch's threaded kernels on 100 small masks took seconds on a
    busy 2-core machine (threads spinning), numpy takes milliseconds. Same indices either way.
    """
    generator = torch.Generator().manual_seed(seed)
    values = labels.cpu().numpy()
    order = np.argsort(values, kind="stable")
    groups = np.split(order, np.cumsum(np.bincount(values))[:-1])
    return [m[torch.randperm(len(m), generator=generator).numpy()] for m in groups]


def _sorted_index(parts: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.sort(np.concatenate(parts)).astype(np.int64))


def stratified_split(
    labels: torch.Tensor, val_fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded per-class split: the same indices on every machine for the same seed."""
    train_parts, val_parts = [], []
    for members in _shuffled_members(labels, seed):
        n_val = round(len(members) * val_fraction)
        val_parts.append(members[:n_val])
        train_parts.append(members[n_val:])
    return _sorted_index(train_parts), _sorted_index(val_parts)


def balanced_subset(labels: torch.Tensor, size: int, seed: int) -> torch.Tensor:
    """Indices of ``size`` images, as evenly spread over the classes as ``size`` allows."""
    per_class = _shuffled_members(labels, seed + 1)
    num = len(per_class)
    take = [size // num + (1 if c < size % num else 0) for c in range(num)]
    return _sorted_index([m[:k] for m, k in zip(per_class, take, strict=True)])


@dataclass(frozen=True)
class Splits:
    train: Split
    val: Split
    test: Split
    train_index: torch.Tensor  # positions of train/val within the full training set, so
    val_index: torch.Tensor  # per-image caches (e.g. backbone features) can be split alike


def make_splits(
    dataset: Cifar100,
    val_fraction: float = 0.2,
    seed: int = 0,
    train_subset: int | None = None,
    refit: bool = False,
) -> Splits:
    """80/20 train/validation from the training images; the test set stays untouched.

    ``refit``: every training image trains and the validation split is empty (it is not
    even drawn), so nothing can select on it.
    """
    if refit:
        train_idx = torch.arange(len(dataset.train))
        val_idx = torch.zeros(0, dtype=torch.int64)
    else:
        train_idx, val_idx = stratified_split(dataset.train.labels, val_fraction, seed)
    if train_subset:
        train_idx = train_idx[balanced_subset(dataset.train.labels[train_idx], train_subset, seed)]
    return Splits(
        dataset.train.subset(train_idx),
        dataset.train.subset(val_idx),
        dataset.test,
        train_idx,
        val_idx,
    )
