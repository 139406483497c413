"""Shared fixtures: a tiny fake CIFAR-100 in the real pickle format, and the real one."""

from __future__ import annotations

import os
import pickle
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

SHARED = Path(os.environ.get("CIFAR100_SHARED", Path(__file__).resolve().parents[2] / "shared"))


def write_fake_cifar(
    root: Path, train_per_class: int = 10, test_per_class: int = 2, seed: int = 0
) -> Path:
    """Write ``root/cifar-100-python/{train,test,meta}`` as the real files are laid out.

    Each class gets its own colour and stripe pattern plus noise, so a model can learn it.
    """
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    colours = rng.integers(30, 225, size=(100, 3))
    for name, per_class in (("train", train_per_class), ("test", test_per_class)):
        fine = np.repeat(np.arange(100), per_class)
        rng.shuffle(fine)
        images = np.empty((len(fine), 3, 32, 32), dtype=np.uint8)
        for i, label in enumerate(fine):
            base = np.broadcast_to(colours[label][:, None, None], (3, 32, 32)).astype(np.int16)
            stripes = ((np.arange(32) // (2 + label % 7)) % 2 * 40)[None, :, None]
            noise = rng.integers(-20, 21, size=(3, 32, 32))
            images[i] = np.clip(base + stripes + noise, 0, 255)
        entry = {
            "data": images.reshape(len(fine), 3072),
            "fine_labels": fine.tolist(),
            "coarse_labels": (fine // 5).tolist(),
            "batch_label": f"fake {name}",
        }
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f, protocol=2)
    meta = {
        "fine_label_names": [f"class_{i:02d}" for i in range(100)],
        "coarse_label_names": [f"super_{i:02d}" for i in range(20)],
    }
    with open(folder / "meta", "wb") as f:
        pickle.dump(meta, f, protocol=2)
    return root


@pytest.fixture(scope="session")
def fake_data_dir(tmp_path_factory) -> Path:
    """Folder holding a tiny fake ``cifar-100-python/`` (1,000 train, 200 test images)."""
    return write_fake_cifar(tmp_path_factory.mktemp("fake_cifar"))


@pytest.fixture(scope="session")
def tiny_run(fake_data_dir, tmp_path_factory) -> Path:
    """One epoch of the quick recipe on the fake data, narrowed so that it takes seconds."""
    from cifar100.cli import main

    run_dir = tmp_path_factory.mktemp("tiny") / "run"
    code = main(
        [
            "train",
            "--preset",
            "quick",
            "--epochs",
            "1",
            "--data-dir",
            str(fake_data_dir),
            "--run-dir",
            str(run_dir),
            "--set",
            "model.widths=[16,32,32,32]",
        ]
    )
    assert code == 0
    return run_dir


@pytest.fixture(scope="session")
def learned_run(fake_data_dir, tmp_path_factory) -> Path:
    """Four epochs on the fake data (~10 s): unlike ``tiny_run`` (1% on every split, two
    classes predicted), its answers differ between images and classes (about 35% top-1,
    val and test figures apart), so that parity checks compare something."""
    from cifar100.cli import main

    run_dir = tmp_path_factory.mktemp("learned") / "run"
    code = main(
        [
            "train",
            "--preset",
            "quick",
            "--epochs",
            "4",
            "--data-dir",
            str(fake_data_dir),
            "--run-dir",
            str(run_dir),
            "--set",
            "model.widths=[16,32,32,32]",
            "--set",
            "train.batch_size=50",
            "--set",
            "optim.lr=0.1",
            "--set",
            "optim.label_smoothing=0.0",
        ]
    )
    assert code == 0
    return run_dir


class FirstEpochWatch:
    """What the loop's next epoch starts from, recorded at its call of ``train_one_epoch``:
    the model's weights, the optimizer's state (on the CPU) and the step it resumes at."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self._monkeypatch = monkeypatch
        self.model: dict | None = None
        self.optimizer: dict | None = None
        self.step: int | None = None

    def watch(self) -> None:
        """Record the next epoch the loop starts (call after any run it should not see)."""
        from cifar100.training import loop

        original = loop.train_one_epoch

        def recording(model, batches, ctx, **kwargs):
            if self.model is None:
                self.model = {
                    _plain_key(k): v.detach().cpu().clone() for k, v in model.state_dict().items()
                }
                self.optimizer = _on_cpu(ctx.optimizer.state_dict())
                self.step = kwargs["state"].step
            return original(model, batches, ctx, **kwargs)

        self._monkeypatch.setattr(loop, "train_one_epoch", recording)

    def assert_starts_from(self, checkpoint: dict) -> None:
        """The epoch started from ``checkpoint``'s weights, optimizer state and step."""
        assert self.model is not None, "no epoch started"
        assert self.step == (checkpoint["epoch_state"] or {}).get("step", 0)
        assert self.model.keys() == checkpoint["model"].keys()
        for key, value in checkpoint["model"].items():
            assert torch.equal(self.model[key], value.cpu()), key
        saved = _on_cpu(checkpoint["optimizer"])["state"]
        assert saved and saved.keys() == self.optimizer["state"].keys()
        for index, entry in saved.items():
            for name, value in entry.items():
                if isinstance(value, torch.Tensor) and value.dim() > 0:  # moments, momentum
                    assert torch.equal(self.optimizer["state"][index][name], value), name


def _plain_key(key: str) -> str:
    """A parameter's name without the wrappers' prefixes (torch.compile, DDP)."""
    for prefix in ("_orig_mod.", "module."):
        key = key.removeprefix(prefix)
    return key


def _on_cpu(value):
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, dict):
        return {k: _on_cpu(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_on_cpu(v) for v in value]
    return value


@pytest.fixture
def first_epoch(monkeypatch) -> FirstEpochWatch:
    """Check that a resumed run starts from its checkpoint (see ``FirstEpochWatch``)."""
    return FirstEpochWatch(monkeypatch)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The real data and weights beside the checkout. Missing is a failure, never a skip."""
    if not (SHARED / "datasets" / "cifar-100-python" / "train").is_file():
        pytest.fail(f"real data not found under {SHARED} (set CIFAR100_SHARED)")
    return SHARED


@pytest.fixture(scope="session")
def real_data_dir(shared_dir) -> Path:
    return shared_dir / "datasets"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Never touch the user's cache or the network from a test by accident."""
    monkeypatch.setenv("CIFAR100_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("CIFAR100_DATA", raising=False)
    monkeypatch.delenv("CIFAR100_WEIGHTS", raising=False)
    monkeypatch.delenv("CIFAR100_EFFICIENTNET_LITE0_WEIGHTS", raising=False)


def _tensorboard_curves(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of ``run_dir/tensorboard/``, read back with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return {t: [(e.step, e.value) for e in events.Scalars(t)] for t in events.Tags()["scalars"]}


def _curves_of_metrics(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """What the event file should hold for ``metrics.jsonl``: one point per epoch of every
    number, tagged STAGE/NAME, as float32 (the precision of a TensorBoard scalar)."""
    import json

    curves: dict[str, list[tuple[int, float]]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        for key, value in row.items():
            if key not in ("stage", "epoch") and isinstance(value, int | float):
                point = (row["epoch"], float(np.float32(value)))
                curves.setdefault(f"{row['stage']}/{key}", []).append(point)
    return curves


@pytest.fixture
def assert_tensorboard_mirrors_metrics():
    """``check(run_dir)``: the epoch curves of the event file are exactly metrics.jsonl's."""

    def check(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
        curves = _tensorboard_curves(run_dir)
        epochs = {tag: points for tag, points in curves.items() if not tag.startswith("final/")}
        assert epochs == _curves_of_metrics(run_dir)
        return curves

    return check


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str) -> list[str]:
    """``python -m torch.distributed.run`` with two processes on this machine, then ``args``
    (``-m cifar100 train ...``)."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        *args,
    ]
