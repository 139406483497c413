"""What each rank trains on under torchrun: its own half of every global batch.

Two ranks that each train the whole global batch average identical gradients, so their
run matches one process's exactly: comparing losses with a single process cannot catch a
loop that lost its sharding. Each rank's own epoch progress can.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

from conftest import torchrun

from cifar100.runtime.checkpoint import load_checkpoint

GLOBAL_BATCH = 64
RECIPE = [
    "--model",
    "cnn-fast",
    "--epochs",
    "2",
    "--set",
    "model.widths=8,16,32",
    "--set",
    f"train.batch_size={GLOBAL_BATCH}",
    "--set",
    "train.checkpoint_minutes=0",  # last.pt at every sync step: mid-epoch progress on file
    "--set",
    "augment.translate=0",
]


def test_each_rank_trains_on_half_of_every_global_batch(fake_data_dir, tmp_path):
    """Catches a loop that skips ``distributed.shard_order``: every rank would count the
    whole global batch per step."""
    run_dir = tmp_path / "run"
    cmd = torchrun(
        "-m",
        "cifar100",
        "train",
        *RECIPE,
        "--data-dir",
        str(fake_data_dir),
        "--run-dir",
        str(run_dir),
    )
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "240",  # torchrun's 30 s is short on a busy CPU
    }
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    last = run_dir / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 300
    while proc.poll() is None and not last.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before its first checkpoint"
    proc.send_signal(signal.SIGINT)  # stop mid-epoch: last.pt keeps each rank's progress
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0, output[-2000:]
    assert not (run_dir / "results.json").exists()  # the interrupt landed mid-run

    state = load_checkpoint(last)
    progress = [rank["epoch_state"] for rank in state["ranks"]]
    assert len(progress) == 2 and all(p is not None for p in progress), "not mid-epoch"
    steps = progress[0]["step"]
    assert steps >= 1 and progress[1]["step"] == steps  # both ranks stopped at one step
    for rank in progress:
        assert rank["seen"] == steps * GLOBAL_BATCH // 2, rank
