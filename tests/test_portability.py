"""Checkpoints move between a GPU and a CPU machine, tested without a GPU.

A file written by a CUDA run differs from a CPU one in three ways: its tensors are tagged
``cuda:0`` (``torch.load`` without ``map_location`` fails on a machine without CUDA), its
random states are CUDA-shaped (a 16-byte Philox generator state, a ``cuda`` entry), and
its optimizer groups say ``fused=True``. ``cuda_shaped`` writes exactly such a file on CPU:
a storage tagger registered ahead of torch's own labels every tensor ``cuda:0``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from cifar100.cli import main
from cifar100.config.schema import OptimConfig, layered_config
from cifar100.deploy.exports import export_run
from cifar100.runs.trained import load_trained
from cifar100.runtime import distributed
from cifar100.runtime.checkpoint import load_checkpoint, restore_generator
from cifar100.training.engine import TrainingInterrupted
from cifar100.training.optim import load_optimizer_state, make_optimizer
from cifar100.training.train import train

PHILOX_STATE = torch.arange(16, dtype=torch.uint8)  # what a CUDA generator's get_state() gives


def cuda_shaped(path: Path) -> None:
    """Rewrite the checkpoint at ``path`` as a CUDA run would have written it."""
    state = torch.load(path, weights_only=True)
    for rng in [state.get("rng"), *[r["rng"] for r in state.get("ranks", [])]]:
        if rng is not None:
            rng["generator"], rng["cuda"] = PHILOX_STATE.clone(), [PHILOX_STATE.clone()]
    for group in state.get("optimizer", {}).get("param_groups", []):
        group.update(fused=True, foreach=None)
    registry = torch.serialization._package_registry
    original = list(registry)
    registry.insert(0, (0, lambda storage: "cuda:0", lambda storage, location: None))
    try:
        torch.save(state, path)
    finally:
        registry[:] = original


def test_a_cuda_shaped_file_needs_map_location_here(tiny_run, tmp_path):
    path = tmp_path / "best.pt"
    shutil.copy(tiny_run / "checkpoints" / "best.pt", path)
    cuda_shaped(path)
    if not torch.cuda.is_available():  # proves the file is what a CUDA run writes
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(path, weights_only=True)
    cpu = load_checkpoint(path)["model"]
    original = load_checkpoint(tiny_run / "checkpoints" / "best.pt")["model"]
    assert all(t.device.type == "cpu" and torch.equal(t, original[k]) for k, t in cpu.items())


@pytest.fixture(scope="module")
def gpu_run(tiny_run, tmp_path_factory) -> Path:
    """The tiny run's folder with both checkpoints as a CUDA run writes them."""
    run_dir = tmp_path_factory.mktemp("from-gpu") / "run"
    shutil.copytree(tiny_run, run_dir)
    for name in ("best.pt", "last.pt"):
        cuda_shaped(run_dir / "checkpoints" / name)
    return run_dir


def test_a_gpu_checkpoint_evaluates_predicts_and_exports_on_cpu(
    gpu_run, fake_data_dir, shared_dir, capsys
):
    assert (
        main(
            [
                "evaluate",
                str(gpu_run),
                "--data-dir",
                str(fake_data_dir),
                "--device",
                "cpu",
                "--json",
            ]
        )
        == 0
    )
    photo = shared_dir / "samples" / "imagenet" / "cat.png"
    assert main(["predict", str(photo), "--model", str(gpu_run), "--json"]) == 0
    report = export_run(gpu_run, "all", None, str(fake_data_dir), 200)
    assert report["checks"]["safetensors"]["max_abs_logit_diff"] == 0.0
    trained = load_trained(gpu_run)
    assert all(p.device.type == "cpu" for p in trained.model.parameters())


def _interrupted_run(fake_data_dir: Path, run_dir: Path, monkeypatch, stop_at: int = 3):
    """A tiny run stopped mid-epoch (as by Ctrl-C at step ``stop_at``): last.pt to resume."""
    config = layered_config(
        "quick",
        overrides={
            "model": {"widths": [8, 8, 8, 8]},
            "data": {"data_dir": str(fake_data_dir)},
            "train": {"epochs": 2, "batch_size": 50, "eval_batch_size": 200},
        },
    )
    votes = []

    def agree(stop: bool, timed: bool) -> tuple[bool, bool]:
        votes.append(stop)
        return len(votes) == stop_at, False

    with monkeypatch.context() as patch:
        patch.setattr(distributed, "agree", agree)
        with pytest.raises(TrainingInterrupted, match="stopped at step 3"):
            train(config, run_dir)


def test_a_gpu_checkpoint_resumes_on_cpu(fake_data_dir, tmp_path, monkeypatch, capfd, first_epoch):
    """Catches a resume that loads neither the model nor the optimizer from the CUDA-shaped
    file: the first resumed step must start from last.pt's weights and momentum."""
    run_dir = tmp_path / "run"
    _interrupted_run(fake_data_dir, run_dir, monkeypatch)
    last = run_dir / "checkpoints" / "last.pt"
    saved = load_checkpoint(last)
    assert saved["epoch_state"]["step"] == 3
    cuda_shaped(last)
    first_epoch.watch()
    results = train(layered_config(files=[run_dir / "config.yaml"]), run_dir, resume=True)
    first_epoch.assert_starts_from(saved)  # step 3 of epoch 1, from the saved state
    # Both epochs ran to the end; which one validates better on 200 fake images is noise.
    epochs = [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").open()]
    assert epochs[-1] == 2 and results["best_epoch"] in (1, 2)
    assert 0 <= results["test_top1"] <= 1
    assert "saved on another kind of device" in capfd.readouterr().err


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_optimizer_state_keeps_this_machines_kernels(name):
    """A fused CUDA optimizer's state loads into a CPU optimizer as CPU state, and steps."""
    config = OptimConfig(optimizer=name, lr=0.1)
    model = torch.nn.Linear(4, 2)
    saved = make_optimizer(model.parameters(), config)
    model(torch.randn(3, 4)).sum().backward()
    saved.step()
    state = saved.state_dict()
    for group in state["param_groups"]:
        group.update(fused=True, foreach=False)  # as a CUDA optimizer saves them
    for entry in state["state"].values():
        if "step" in entry:
            entry["step"] = entry["step"].float()  # fused keeps its step count as float32
    here = make_optimizer(model.parameters(), config)
    load_optimizer_state(here, state)
    assert [g.get("fused") for g in here.param_groups] == [None, None]
    assert [g.get("foreach") for g in here.param_groups] == [None, None]
    here.step()  # on CPU, with the loaded momentum / moments


def test_a_generator_state_from_another_device_keeps_the_seed(capsys):
    generator = torch.Generator().manual_seed(7)
    expected = torch.Generator().manual_seed(7).get_state()
    restore_generator(generator, PHILOX_STATE)  # a CUDA generator's state on a CPU run
    assert torch.equal(generator.get_state(), expected)
    assert "another kind of device" in capsys.readouterr().err
    saved = torch.Generator().manual_seed(9).get_state()
    restore_generator(generator, saved)  # the same kind: restored exactly
    assert torch.equal(generator.get_state(), saved)
