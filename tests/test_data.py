"""Loader, validation, sources and splits: the fake set for behaviour, the real set for facts."""

from __future__ import annotations

import os
import pickle
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_fake_cifar

from cifar100.data.cifar import (
    FOLDER,
    DataError,
    balanced_subset,
    default_cache_dir,
    load_cifar100,
    make_splits,
    resolve_data_dir,
    stratified_split,
)


def per_class(labels: torch.Tensor) -> set[int]:
    return set(torch.bincount(labels, minlength=100).tolist())


# --- the fake set: shapes, names, sources ---------------------------------------------------


def test_fake_set_shapes_dtypes_names(fake_data_dir):
    dataset = load_cifar100(fake_data_dir)
    assert dataset.train.images.shape == (1000, 3, 32, 32)
    assert dataset.test.images.shape == (200, 3, 32, 32)
    assert dataset.train.images.dtype == torch.uint8
    assert dataset.train.labels.dtype == dataset.train.coarse_labels.dtype == torch.int64
    assert per_class(dataset.train.labels) == {10} and per_class(dataset.test.labels) == {2}
    assert dataset.class_names[7] == "class_07" and len(dataset.class_names) == 100
    assert dataset.superclass_names[3] == "super_03" and len(dataset.superclass_names) == 20
    assert torch.equal(dataset.fine_to_coarse(), torch.arange(100) // 5)
    assert dataset.source == fake_data_dir / FOLDER


def test_rows_are_channel_major_planes(fake_data_dir):
    with open(fake_data_dir / FOLDER / "train", "rb") as f:
        raw = pickle.load(f, encoding="latin1")["data"]
    images = load_cifar100(fake_data_dir).train.images
    for channel in range(3):  # R, G, B planes of 1024 bytes each
        plane = raw[5, channel * 1024 : (channel + 1) * 1024].reshape(32, 32)
        assert np.array_equal(images[5, channel].numpy(), plane)


def test_sources_in_order(fake_data_dir, tmp_path, monkeypatch):
    # The cache holds a different (smaller) set, so each source can be told apart.
    write_fake_cifar(default_cache_dir(), train_per_class=3, test_per_class=1)
    assert resolve_data_dir() == default_cache_dir()
    assert len(load_cifar100().train) == 300
    monkeypatch.setenv("CIFAR100_DATA", str(fake_data_dir))
    assert len(load_cifar100().train) == 1000  # the variable beats the cache
    monkeypatch.setenv("CIFAR100_DATA", str(tmp_path / "nothing here"))
    assert len(load_cifar100(default_cache_dir()).train) == 300  # the flag beats the variable
    assert resolve_data_dir(fake_data_dir / FOLDER) == fake_data_dir  # the folder itself
    with pytest.raises(DataError, match="no cifar-100-python/ folder"):
        resolve_data_dir(tmp_path / "elsewhere")  # an explicit path never falls back


def test_explicit_path_without_data_names_it(tmp_path):
    with pytest.raises(DataError) as caught:
        load_cifar100(tmp_path)
    assert str(caught.value).startswith(str(tmp_path)) and "--data-dir" in str(caught.value)


# --- validation: every broken file gives one line naming the file ---------------------------


def entry_of(root: Path, name: str) -> dict:
    with open(root / FOLDER / name, "rb") as f:
        return pickle.load(f, encoding="latin1")


def drop_key(e):
    e["pixels"] = e.pop("data")


def float_pixels(e):
    e["data"] = e["data"].astype(np.float32)


def wrong_width(e):
    e["data"] = e["data"][:, :3000]


def label_too_big(e):
    e["fine_labels"][0] = 100


def label_negative(e):
    e["coarse_labels"][3] = -1


def labels_not_integers(e):
    e["fine_labels"] = [str(v) for v in e["fine_labels"]]


def labels_too_few(e):
    e["fine_labels"] = e["fine_labels"][:-1]


def unbalanced(e):
    e["fine_labels"][e["fine_labels"].index(1)] = 2


def coarse_disagrees(e):
    first = e["fine_labels"].index(0)
    e["coarse_labels"][first] = 19


BROKEN = {
    drop_key: "missing key 'data'",
    float_pixels: "uint8",
    wrong_width: r"shape \(1000, 3000\)",
    label_too_big: "'fine_labels' outside 0..99",
    label_negative: "'coarse_labels' outside 0..19",
    labels_not_integers: "'fine_labels' must hold 1000 integers",
    labels_too_few: "'fine_labels' must hold 1000 integers",
    unbalanced: "unbalanced",
    coarse_disagrees: "disagree",
}


@pytest.fixture
def copy_dir(fake_data_dir, tmp_path) -> Path:
    shutil.copytree(fake_data_dir / FOLDER, tmp_path / "copy" / FOLDER)
    return tmp_path / "copy"


def assert_names_file(caught, path: Path, pattern: str) -> None:
    message = str(caught.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    assert re.search(pattern, message), message


@pytest.mark.parametrize("damage", list(BROKEN), ids=lambda f: f.__name__)
def test_wrong_content_is_one_line_naming_the_file(copy_dir, damage):
    path = copy_dir / FOLDER / "train"
    entry = entry_of(copy_dir, "train")
    damage(entry)
    path.write_bytes(pickle.dumps(entry, protocol=2))
    with pytest.raises(DataError) as caught:
        load_cifar100(copy_dir)
    assert_names_file(caught, path, BROKEN[damage])


@pytest.mark.parametrize(
    "name,content,pattern",
    [
        ("train", "truncated", "truncated"),
        ("test", "garbage", "unreadable|not a CIFAR-100 pickle"),
        ("train", "empty", "truncated"),
        ("train", "list", "expected a dict, found list"),
        ("meta", "fewer names", "'fine_label_names' must list 100 names"),
        ("test", "missing", "file missing"),
    ],
)
def test_unreadable_files_are_one_line_naming_the_file(copy_dir, name, content, pattern):
    path = copy_dir / FOLDER / name
    good = path.read_bytes()
    if content == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif content == "garbage":
        path.write_bytes(os.urandom(4096))
    elif content == "empty":
        path.write_bytes(b"")
    elif content == "list":
        path.write_bytes(pickle.dumps([1, 2, 3], protocol=2))
    elif content == "fewer names":
        meta = entry_of(copy_dir, "meta")
        meta["fine_label_names"] = meta["fine_label_names"][:99]
        path.write_bytes(pickle.dumps(meta, protocol=2))
    else:
        path.unlink()
    with pytest.raises(DataError) as caught:
        load_cifar100(copy_dir)
    assert_names_file(caught, path, pattern)


class Payload:
    """Unpickling this would create a file: a loader must refuse to build it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_cannot_run_code(copy_dir, tmp_path):
    marker = tmp_path / "pwned"
    path = copy_dir / FOLDER / "train"
    entry = entry_of(copy_dir, "train")
    entry["batch_label"] = Payload(marker)
    path.write_bytes(pickle.dumps(entry, protocol=2))
    with pytest.raises(DataError) as caught:
        load_cifar100(copy_dir)
    assert_names_file(caught, path, "refused to build")
    assert not marker.exists()


# --- splits ----------------------------------------------------------------------------------


def test_stratified_split_exact_per_class_counts():
    labels = torch.arange(100).repeat(500)[torch.randperm(50_000)]
    train, val = stratified_split(labels, 0.2, seed=0)
    assert per_class(labels[train]) == {400} and per_class(labels[val]) == {100}
    assert len(np.intersect1d(train.numpy(), val.numpy())) == 0
    assert torch.equal(torch.cat([train, val]).sort().values, torch.arange(50_000))


def test_split_is_seeded(fake_data_dir):
    dataset = load_cifar100(fake_data_dir)
    a, b = make_splits(dataset, 0.2, seed=3), make_splits(dataset, 0.2, seed=3)
    c = make_splits(dataset, 0.2, seed=4)
    assert torch.equal(a.val.images, b.val.images) and torch.equal(a.train.labels, b.train.labels)
    assert not torch.equal(a.val.images, c.val.images)
    assert len(a.train) == 800 and len(a.val) == 200
    assert per_class(a.train.labels) == {8} and per_class(a.val.labels) == {2}
    assert a.test is dataset.test  # the test set never takes part in the split


def test_train_subset_is_balanced_and_inside_the_train_split(fake_data_dir):
    dataset = load_cifar100(fake_data_dir)
    full = make_splits(dataset, 0.2, seed=1)
    small = make_splits(dataset, 0.2, seed=1, train_subset=300)
    assert len(small.train) == 300 and per_class(small.train.labels) == {3}
    assert torch.equal(small.val.images, full.val.images)
    train_rows = {bytes(img.numpy()) for img in full.train.images}
    assert all(bytes(img.numpy()) in train_rows for img in small.train.images)


def test_balanced_subset_spreads_the_remainder():
    labels = torch.arange(100).repeat(8)
    idx = balanced_subset(labels, 250, seed=0)
    counts = torch.bincount(labels[idx], minlength=100)
    assert len(idx) == 250 and set(counts.tolist()) == {2, 3} and int(counts.sum()) == 250
    assert len(set(idx.tolist())) == 250
    assert torch.equal(idx, balanced_subset(labels, 250, seed=0))
    assert not torch.equal(idx, balanced_subset(labels, 250, seed=1))


# --- the real set ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real(real_data_dir):
    start = time.perf_counter()
    dataset = load_cifar100(real_data_dir)
    return dataset, time.perf_counter() - start


def test_real_set_counts_and_order(real):
    dataset, _ = real
    assert dataset.train.images.shape == (50_000, 3, 32, 32)
    assert dataset.test.images.shape == (10_000, 3, 32, 32)
    assert per_class(dataset.train.labels) == {500} and per_class(dataset.test.labels) == {100}
    first = [19, 29, 0, 11, 1, 86, 90, 28, 23, 31]
    assert dataset.train.labels[:10].tolist() == first
    assert dataset.class_names[19] == "cattle" and dataset.class_names[0] == "apple"
    assert dataset.superclass_names[0] == "aquatic_mammals"
    assert set(torch.bincount(dataset.fine_to_coarse()).tolist()) == {5}


def test_real_set_channel_statistics(real):
    images = real[0].train.images  # the published means tell R, G, B planes apart
    values = torch.arange(256, dtype=torch.float64) / 255
    hist = torch.stack([torch.bincount(images[:, c].flatten(), minlength=256) for c in range(3)])
    probs = hist.double() / hist.sum(dim=1, keepdim=True)  # (3, 256) exact moments, no floats
    mean = probs @ values
    std = (probs @ values**2 - mean**2).sqrt()
    assert torch.allclose(
        mean, torch.tensor([0.5071, 0.4865, 0.4409], dtype=torch.float64), atol=5e-4
    )
    assert torch.allclose(
        std, torch.tensor([0.2673, 0.2564, 0.2762], dtype=torch.float64), atol=5e-4
    )


def test_real_split_400_100_per_class(real):
    dataset, _ = real
    splits = make_splits(dataset, 0.2, seed=0)
    assert len(splits.train) == 40_000 and len(splits.val) == 10_000
    assert per_class(splits.train.labels) == {400} and per_class(splits.val.labels) == {100}
    assert splits.test is dataset.test
    # Pinned: a run's validation set must not move between versions or machines.
    _, val = stratified_split(dataset.train.labels, 0.2, seed=0)
    assert val[:8].tolist() == [0, 10, 14, 31, 35, 36, 38, 44] and int(val.sum()) == 248604788
    assert torch.equal(splits.val.images, dataset.train.images[val])


def test_real_set_loads_fast(real):
    # The issue asks for under 3 s; the machine running the tests may be busy.
    _, seconds = real
    print(f"real CIFAR-100 loaded in {seconds:.2f} s")
    assert seconds < 3.0
