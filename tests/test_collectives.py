"""The collective helpers as a GPU run calls them, without a GPU.

nccl can only reduce tensors on the rank's GPU; a CPU tensor handed to it fails the first
step. Here a recording fake stands in for ``torch.distributed`` and the rank's device is
``meta`` (not the CPU, and available everywhere): every tensor a helper hands to a
collective must sit there.
"""

from __future__ import annotations

import builtins

import pytest
import torch

from cifar100.config.schema import ModelConfig
from cifar100.models import build_model
from cifar100.runtime import distributed

META = torch.device("meta")


class RecordingDist:
    """Stands in for ``torch.distributed`` on one of two ranks; records every call."""

    class ReduceOp:
        MAX = "max"
        SUM = "sum"

    def __init__(self, rank: int = 0, initialized: bool = True):
        self.rank, self.initialized = rank, initialized
        self.calls: list[tuple[str, torch.device | None]] = []
        self.backend: str | None = None

    def is_available(self) -> bool:
        return True

    def is_initialized(self) -> bool:
        return self.initialized

    def init_process_group(self, backend: str, **kwargs) -> None:
        self.backend, self.initialized = backend, True

    def get_world_size(self) -> int:
        return 2

    def get_rank(self) -> int:
        return self.rank

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> None:
        self.calls.append(("all_reduce", tensor.device))

    def broadcast(self, tensor: torch.Tensor, src: int) -> None:
        self.calls.append(("broadcast", tensor.device))

    def barrier(self) -> None:
        self.calls.append(("barrier", None))

    def all_gather_object(self, out: list, obj) -> None:
        self.calls.append(("all_gather_object", None))
        out[:] = [obj] * len(out)

    def broadcast_object_list(self, box: list, src: int) -> None:
        self.calls.append(("broadcast_object_list", None))

    def tensor_devices(self) -> set[torch.device]:
        return {device for _, device in self.calls if device is not None}


@pytest.fixture
def fake(monkeypatch) -> RecordingDist:
    """Rank 0 of 2 whose device is ``meta``; results read back as ones (meta holds none)."""
    recorder = RecordingDist()
    monkeypatch.setattr(distributed, "dist", recorder)
    monkeypatch.setattr(distributed, "_COLLECTIVE_DEVICE", META)
    reads: list[torch.device] = []

    def to_host(tensor: torch.Tensor) -> list[float]:
        reads.append(tensor.device)
        return [1.0] * tensor.numel()

    monkeypatch.setattr(distributed, "_to_host", to_host)
    recorder.reads = reads
    return recorder


def test_agree_votes_with_a_tensor_on_the_ranks_device(fake):
    assert distributed.agree(True, False) == (True, True)  # the fake reads back ones
    assert fake.calls == [("all_reduce", META)]
    assert fake.reads == [META]  # one read, after the collective


def test_mean_metrics_reduces_on_the_ranks_device(fake):
    distributed.mean_metrics({"loss": 1.5, "top1": 0.5}, weight=200)
    assert fake.calls == [("all_reduce", META)]


def _no_rank_stopped(fake, monkeypatch) -> None:
    """The stop vote (one number) reads back 0; the metrics' sums read back ones."""

    def to_host(tensor: torch.Tensor) -> list[float]:
        fake.reads.append(tensor.device)
        return [0.0] if tensor.numel() == 1 else [1.0] * tensor.numel()

    monkeypatch.setattr(distributed, "_to_host", to_host)


def test_sharded_evaluation_only_hands_device_tensors_to_collectives(fake, monkeypatch):
    _no_rank_stopped(fake, monkeypatch)
    model = build_model(ModelConfig(name="cnn-fast", widths=(8, 16, 32, 32))).to(META)
    batches = type("Batches", (), {"__len__": lambda self: 10})()

    def evaluate(model, part, batch_size):
        assert len(part) == 5  # rank 0's half
        return {"loss": 1.0, "top1": 0.5, "top5": 0.75}

    distributed.evaluate_sharded(evaluate, model, batches, 100)
    names = [name for name, _ in fake.calls]
    assert names.count("broadcast") == len(list(model.buffers())) > 0  # BN statistics
    assert names[-2:] == ["all_reduce", "all_reduce"]  # the stop vote, then the metrics
    assert fake.tensor_devices() == {META}


def test_a_stop_in_one_ranks_slice_is_voted_on_and_raised_on_every_rank(fake, monkeypatch):
    model = torch.nn.Linear(2, 2).to(META)  # no buffers to broadcast
    batches = type("Batches", (), {"__len__": lambda self: 10})()

    def stopped(model, part):
        raise KeyboardInterrupt("stop now")

    # The stopped rank joins the vote before raising: the others are not left waiting.
    with pytest.raises(KeyboardInterrupt, match="stop now"):
        distributed.evaluate_sharded(stopped, model, batches)
    assert [name for name, _ in fake.calls] == ["all_reduce"]
    # A rank that was not stopped learns it from the vote (read back as 1) and stops too,
    # before the metrics' all-reduce, which the stopped rank never joins.
    fake.calls.clear()
    with pytest.raises(KeyboardInterrupt, match="another rank was stopped"):
        distributed.evaluate_sharded(lambda model, part: {"loss": 1.0}, model, batches)
    assert [name for name, _ in fake.calls] == ["all_reduce"]


def test_rank_states_and_results_travel_as_objects(fake):
    distributed.gather_rank_states({"torch": torch.zeros(2)}, None)
    distributed.share({"test_top1": 0.5})
    assert [name for name, _ in fake.calls] == [
        "all_gather_object",
        "broadcast_object_list",
        "barrier",
    ]


def test_init_on_cuda_joins_nccl_for_tensors_and_gloo_for_objects(monkeypatch):
    recorder = RecordingDist(rank=1, initialized=False)
    chosen: list[torch.device] = []
    monkeypatch.setattr(distributed, "dist", recorder)
    monkeypatch.setattr(distributed, "_COLLECTIVE_DEVICE", torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(distributed.atexit, "register", lambda fn: None)
    monkeypatch.setattr(builtins, "print", builtins.print)  # init silences rank 1's print
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    device = distributed.init(torch.device("cuda"))
    assert device == torch.device("cuda", 1) == distributed.collective_device()
    assert chosen == [device]
    assert recorder.backend == "cuda:nccl,cpu:gloo"


def test_collectives_stay_on_cpu_under_gloo(fake, monkeypatch):
    monkeypatch.setattr(distributed, "_COLLECTIVE_DEVICE", torch.device("cpu"))
    distributed.agree(False)
    assert fake.tensor_devices() == {torch.device("cpu")}


@pytest.mark.parametrize(
    "rank, local_rank, expected",
    [
        (0, 0, ["fetch(True)", "barrier", "barrier"]),  # downloads while all others wait
        (1, 1, ["barrier", "barrier", "fetch(False)"]),  # same machine: reads rank 0's cache
        (2, 0, ["barrier", "fetch(True)", "barrier"]),  # first on another machine: its own cache
    ],
)
def test_rank_zero_downloads_first_and_the_others_wait(monkeypatch, rank, local_rank, expected):
    events: list[str] = []
    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    monkeypatch.setattr(distributed, "rank", lambda: rank)
    monkeypatch.setattr(distributed, "local_rank", lambda: local_rank)
    monkeypatch.setattr(distributed, "barrier", lambda: events.append("barrier"))

    def fetch(may_download: bool) -> str:
        events.append(f"fetch({may_download})")
        return "root"

    assert distributed.main_first(fetch) == "root"
    assert events == expected


def test_a_failed_download_still_passes_the_barriers(monkeypatch):
    events: list[str] = []
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "rank", lambda: 0)
    monkeypatch.setattr(distributed, "barrier", lambda: events.append("barrier"))

    def offline(may_download: bool) -> str:
        raise OSError("no network")

    with pytest.raises(OSError, match="no network"):
        distributed.main_first(offline)
    assert events == ["barrier", "barrier"]  # the other ranks were not left waiting
