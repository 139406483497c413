"""DDP under torchrun: 2 CPU processes with gloo, on the fake data set.

The launches are real (``python -m torch.distributed.run``), so these tests check what a
user gets: the sharding, rank-0-only files and output, Ctrl-C agreed on by both ranks, and
a resume under DDP that equals the uninterrupted run to the last digit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import torchrun

from cifar100.runs.trained import load_trained
from cifar100.runtime import distributed
from cifar100.runtime.checkpoint import load_checkpoint

EPOCHS = 6
# Tiny widths, no augmentation and no dropout: the only difference left between one
# process and two is BatchNorm, which normalises each rank's half batch on its own.
RECIPE = [
    "--model",
    "cnn-fast",
    "--epochs",
    str(EPOCHS),
    "--set",
    "model.widths=8,16,32",
    "--set",
    "train.batch_size=64",
    "--set",
    "augment.flip=false",
    "--set",
    "augment.translate=0",
    "--set",
    "optim.optimizer=adam",
    "--set",
    "optim.lr=0.003",
    "--set",
    "optim.schedule=constant",
    "--set",
    "optim.weight_decay=0",
    "--set",
    "optim.label_smoothing=0",
]
# Relative tolerance on the losses, one process vs two (per-rank BatchNorm statistics;
# SyncBatchNorm has no CPU kernel). Measured gap: under 3%; training moves the validation
# loss by over 30% in these epochs, so a wrong shard or learning rate would show.
LOSS_RTOL = 0.06


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _torchrun(*args: str) -> list[str]:
    return torchrun("-m", "cifar100", "train", *args)


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rows]


@pytest.fixture(scope="module")
def single(fake_data_dir, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("single") / "run"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "cifar100",
            "train",
            *RECIPE,
            "--data-dir",
            str(fake_data_dir),
            "--run-dir",
            str(run_dir),
        ],
        env=_env(),
        check=True,
        capture_output=True,
        timeout=300,
    )
    return run_dir


@pytest.fixture(scope="module")
def ddp(fake_data_dir, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    run_dir = tmp_path_factory.mktemp("ddp") / "run"
    result = subprocess.run(
        _torchrun(*RECIPE, "--data-dir", str(fake_data_dir), "--run-dir", str(run_dir)),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, result


def test_two_processes_match_one_with_the_same_global_batch(single, ddp):
    one, two = _rows(single), _rows(ddp[0])
    assert [r["epoch"] for r in two] == list(range(1, EPOCHS + 1))
    assert one[-1]["val_loss"] < 0.7 * one[0]["val_loss"]  # training did move the loss
    for a, b in zip(one, two, strict=True):
        assert b["lr"] == pytest.approx(a["lr"])  # same steps per epoch: no lr rescaling
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=LOSS_RTOL)
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=LOSS_RTOL)


def test_only_rank_zero_writes_and_prints(ddp, assert_tensorboard_mirrors_metrics):
    run_dir, result = ddp
    assert result.stderr.count("[main] epoch") == EPOCHS  # not once more from rank 1
    assert result.stdout.count("test top-1") == 1
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best.pt", "last.pt"]
    assert {p.name for p in run_dir.iterdir()} >= {
        "config.yaml",
        "run.json",
        "metrics.jsonl",
        "curves.png",
        "results.json",
    }
    assert len(list((run_dir / "tensorboard").iterdir())) == 1  # one writer: rank 0's
    assert_tensorboard_mirrors_metrics(run_dir)
    last = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert len(last["ranks"]) == 2  # every rank's RNG state, for an exact resume
    assert last["ranks"][0]["rng"]["generator"].ne(last["ranks"][1]["rng"]["generator"]).any()
    assert not any(key.startswith("module.") for key in last["model"])
    trained = load_trained(run_dir)  # single-process tools load the DDP checkpoint
    logits = trained.classifier()(torch.rand(2, 3, 32, 32))
    assert logits.shape == (2, 100)
    assert "test_top1" in json.loads((run_dir / "results.json").read_text())


def test_ctrl_c_stops_both_ranks_and_resume_equals_uninterrupted(fake_data_dir, tmp_path, ddp):
    run_dir = tmp_path / "interrupted"
    # torchrun SIGKILLs workers 30 s after forwarding the signal: more on a starved CPU.
    env = {**_env(), "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "240"}
    proc = subprocess.Popen(
        _torchrun(*RECIPE, "--data-dir", str(fake_data_dir), "--run-dir", str(run_dir)),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and metrics.read_text()) and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)  # what Ctrl-C sends; torchrun forwards it to both ranks
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0, output[-2000:]
    # Both ranks stopped at the same step and said so; a rank left waiting in an all-reduce
    # would have been killed silently.
    assert output.count("state saved, resume with") == 2
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert state["epoch"] < EPOCHS and state["epoch_state"]["step"] >= 1  # mid-epoch

    resumed = subprocess.run(
        _torchrun("--resume", str(run_dir)), env=_env(), capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _without_timing(_rows(run_dir)) == _without_timing(_rows(ddp[0]))
    a = load_checkpoint(run_dir / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(ddp[0] / "checkpoints" / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in b)


@pytest.fixture
def two_ranks(monkeypatch):
    """Pretend to be one of 2 ranks, for the helpers that need no communication."""
    monkeypatch.setattr(distributed, "world_size", lambda: 2)

    def as_rank(r: int) -> None:
        monkeypatch.setattr(distributed, "rank", lambda: r)

    return as_rank


def test_rank_shards_cover_each_global_batch_exactly(two_ranks):
    order = torch.randperm(103, generator=torch.Generator().manual_seed(0))
    shards = []
    for r in (0, 1):
        two_ranks(r)
        shard, per_rank = distributed.shard_order(order, 10)
        assert per_rank == 5 and len(shard) == 50  # 10 full global batches, ragged end dropped
        shards.append(shard.view(10, 5))
    for step in range(10):
        together = torch.cat([shards[0][step], shards[1][step]])
        assert torch.equal(together, order[step * 10 : (step + 1) * 10])


def test_global_batch_must_divide_by_world_size(two_ranks):
    two_ranks(0)
    with pytest.raises(distributed.DistributedError, match="train.batch_size=9"):
        distributed.shard_order(torch.arange(20), 9)


def test_sync_bn_on_cpu_is_a_clear_error(two_ranks):
    two_ranks(0)
    with pytest.raises(distributed.DistributedError, match="train.sync_bn needs CUDA"):
        distributed.wrap_model(torch.nn.BatchNorm2d(3), torch.device("cpu"), sync_bn=True)


def test_helpers_are_identity_in_one_process():
    order = torch.arange(10)
    assert distributed.shard_order(order, 4) == (order, 4)
    assert distributed.agree(True, False) == (True, False)
    assert distributed.mean_metrics({"loss": 1.5}) == {"loss": 1.5}
    model = torch.nn.Linear(2, 2)
    assert distributed.wrap_model(model, torch.device("cpu"), sync_bn=True) is model
    assert distributed.gather_rank_states({}, None) == {}
