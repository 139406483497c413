"""Data-parallel training under ``torchrun``: one process per core group or GPU.

``torchrun --nproc_per_node=N -m cifar100 train ...`` sets WORLD_SIZE, RANK and LOCAL_RANK;
``init`` reads them and joins the process group (gloo on CPU; on CUDA nccl for tensors on
the GPU, gloo for the few Python objects exchanged). Every helper here is a no-op in a
plain single process, so the training loop calls them unconditionally and a
single-process run is unchanged, bit for bit.

The choices, and why:

- ``train.batch_size`` is the *global* batch. Every rank takes the same seeded epoch
  permutation and its own contiguous slice of each global batch, so the union of the
  per-rank batches is the single-process batch and DDP's gradient mean is the same
  gradient: the learning rate and the schedule need no rescaling.
- Validation is sharded: each rank evaluates a contiguous slice and the metrics are
  all-reduced, so every rank sees the very same numbers and takes the same decisions
  (plateau steps, best checkpoint, early stopping) without further talk.
- Only rank 0 writes files and prints progress; ``print`` to stdout is silenced on the
  others (as in torchvision's references); errors on stderr still show.
- Stopping (Ctrl-C, SIGTERM, the checkpoint timer) is agreed on with an all-reduce: a rank
  that stopped alone would leave the others waiting in DDP's all-reduce. The training loop
  agrees every ``train.sync_every`` steps, not every step, because reading the vote back
  makes the host wait for the GPU.
- Every tensor handed to a collective lives on ``collective_device()``, the rank's GPU
  under nccl: nccl cannot reduce CPU tensors.
"""

from __future__ import annotations

import atexit
import builtins
import os
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from cifar100.errors import UserError
from cifar100.runtime.checkpoint import restore_rng


class DistributedError(UserError):
    """A setting that does not fit the distributed launch (names the setting)."""


T = TypeVar("T")
_COLLECTIVE_DEVICE = torch.device("cpu")  # set by init(): where collective tensors live


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def local_rank() -> int:
    """This process's index on its own machine (0 in a single process)."""
    return int(os.environ.get("LOCAL_RANK", "0")) if world_size() > 1 else 0


def collective_device() -> torch.device:
    """The device of every tensor this module hands to a collective: the rank's GPU on CUDA."""
    return _COLLECTIVE_DEVICE


def init(device: torch.device) -> torch.device:
    """Join the process group when launched by torchrun; return this rank's device.

    On CUDA every process drives one GPU, ``cuda:LOCAL_RANK``, and the group pairs nccl
    (GPU tensors: gradients, metrics, votes) with gloo (CPU: barriers, pickled objects
    such as the RNG states). Called again (a second ``train()`` in the same process) it
    keeps the group it has.
    """
    global _COLLECTIVE_DEVICE
    if env_world_size() <= 1:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    _COLLECTIVE_DEVICE = device if device.type == "cuda" else torch.device("cpu")
    if not dist.is_initialized():
        backend = "cuda:nccl,cpu:gloo" if device.type == "cuda" else "gloo"
        # Rank 0 alone measures the test set at the end, and the first process of each
        # machine fills its feature caches, while the others wait: give them time.
        dist.init_process_group(backend, timeout=timedelta(minutes=group_timeout_minutes()))
        atexit.register(shutdown)
        _quiet_print(is_main())
    return device


TIMEOUT_VAR = "CIFAR100_DIST_TIMEOUT_MIN"
DEFAULT_TIMEOUT_MIN = 60.0


def group_timeout_minutes() -> float:
    """How long a rank waits in a collective for the others: $CIFAR100_DIST_TIMEOUT_MIN or 60.

    Raise it where one process extracts features or tests for longer than an hour (a slow
    CPU, a large cache to fill) while the others wait at a barrier.
    """
    raw = os.environ.get(TIMEOUT_VAR, "").strip()
    if not raw:
        return DEFAULT_TIMEOUT_MIN
    try:
        minutes = float(raw)
    except ValueError:
        minutes = -1.0
    if not minutes > 0:
        raise DistributedError(f"{TIMEOUT_VAR}={raw!r}: expected a number of minutes above 0")
    return minutes


def launch() -> dict[str, Any]:
    """How many processes train, on how many machines, started by which command.

    ``nodes`` comes from torchrun's GROUP_WORLD_SIZE (else WORLD_SIZE / LOCAL_WORLD_SIZE);
    ``launcher`` is the command line of torchrun itself (the parent process, read from
    /proc on Linux; None elsewhere or without torchrun): the workers' own argv does not
    say how many processes there were.
    """
    world = env_world_size()
    if world <= 1:
        return {"world_size": 1, "nodes": 1, "launcher": None}
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    nodes = int(os.environ.get("GROUP_WORLD_SIZE", max(world // max(per_node, 1), 1)))
    return {"world_size": world, "nodes": nodes, "launcher": _launcher_command()}


def _launcher_command() -> list[str] | None:
    if "TORCHELASTIC_RUN_ID" not in os.environ:  # not started by torchrun's agent
        return None
    try:
        raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
    except OSError:
        return None
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part] or None


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _quiet_print(main: bool) -> None:
    """Silence ``print`` to stdout on ranks other than 0, unless called with ``force=True``.

    Messages to stderr (errors, warnings) still show: a failing rank must say why.
    """
    original = builtins.print

    def print_main(*args, force: bool = False, **kwargs):
        if main or force or kwargs.get("file") not in (None, sys.stdout):
            original(*args, **kwargs)

    builtins.print = print_main


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def main_first(fetch: Callable[[bool], T]) -> T:
    """``fetch(may_download)`` on every rank, with one download per machine at most.

    Rank 0 fetches first while the others wait at a barrier; then the first process of
    each other machine (its cache may be its own); then the rest, with
    ``may_download=False``: they only read what is now there. Without this every rank
    would download and extract into the same cache at once. A failure is raised after the
    barriers, so that no rank is left waiting for one that gave up.
    """
    if world_size() == 1:
        return fetch(True)
    result: Any = None
    error: Exception | None = None
    for my_turn in (rank() == 0, local_rank() == 0):
        if my_turn and result is None and error is None:
            try:
                result = fetch(True)
            except Exception as failure:  # re-raised below, once every rank has passed
                error = failure
        barrier()
    if error is not None:
        raise error
    return fetch(False) if result is None else result


def wrap_model(model: nn.Module, device: torch.device, sync_bn: bool = False) -> nn.Module:
    """DistributedDataParallel around ``model`` (which stays the one to save and evaluate).

    DDP broadcasts rank 0's weights on construction, so every rank starts from the same
    model. Call it before restoring a checkpoint, which then sets each rank's RNG state.
    """
    if world_size() == 1:
        return model
    # Dropout draws from the global RNG, seeded alike on every rank for initialisation:
    # give each rank its own stream (a resume then restores each rank's saved one).
    torch.manual_seed(torch.initial_seed() + rank())
    if sync_bn:
        if device.type != "cuda":
            raise DistributedError(
                "train.sync_bn needs CUDA: PyTorch's SyncBatchNorm has no "
                "CPU kernel (set train.sync_bn=false for gloo on CPU)"
            )
        # Swaps BatchNorm modules in place and keeps their parameters: the optimizer holds on.
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def shard_order(order: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, int]:
    """This rank's part of every global batch of ``order``, and the per-rank batch size.

    Global batch ``i`` is ``order[i*B:(i+1)*B]``; rank ``r`` takes its ``r``-th slice of
    ``B / world`` indices, so step ``i`` of every rank together covers global batch ``i``.
    """
    world = world_size()
    if world == 1:
        return order, batch_size
    if batch_size % world:
        raise DistributedError(
            f"train.batch_size={batch_size} is the global batch and must be "
            f"divisible by the number of processes ({world})"
        )
    per_rank, steps = batch_size // world, len(order) // batch_size
    mine = order[: steps * batch_size].view(steps, world, per_rank)[:, rank()]
    return mine.reshape(-1), per_rank


def _to_host(tensor: torch.Tensor) -> list[float]:
    """A collective's result as Python numbers: the one place these helpers wait for it."""
    return tensor.tolist()


def agree(*flags: bool) -> tuple[bool, ...]:
    """Each flag is True on every rank if it is True on any (one small all-reduce)."""
    if world_size() == 1:
        return flags
    votes = torch.tensor([float(f) for f in flags], device=collective_device())
    dist.all_reduce(votes, op=dist.ReduceOp.MAX)
    return tuple(bool(v) for v in _to_host(votes))


def mean_metrics(metrics: dict[str, float], weight: float = 1.0) -> dict[str, float]:
    """Average of every rank's metrics, weighted by ``weight`` (e.g. its number of images)."""
    if world_size() == 1:
        return metrics
    keys = sorted(metrics)
    values = torch.tensor(
        [metrics[k] * weight for k in keys] + [weight],
        dtype=torch.float64,
        device=collective_device(),
    )
    dist.all_reduce(values)
    *sums, total = _to_host(values)
    return {k: v / total for k, v in zip(keys, sums, strict=True)}


def sync_buffers(model: nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm statistics), as DDP does at each forward.

    Without it each rank's running statistics include its own last batch, so the ranks
    would evaluate slightly different models from the one rank 0 checkpoints.
    """
    if world_size() == 1:
        return
    for buffer in model.buffers():  # on the model's device, the rank's GPU under nccl
        dist.broadcast(buffer, src=0)


class Shard:
    """A contiguous slice of a batch source (``get``/``labels``/``len``), for evaluation."""

    def __init__(self, batches: Any, start: int, stop: int):
        self.batches, self.start, self.stop = batches, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    @property
    def labels(self) -> torch.Tensor:
        return self.batches.labels[self.start : self.stop]

    def get(self, indices: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.batches.get(indices + self.start, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:  # device and the like
        return getattr(self.batches, name)


def evaluate_sharded(evaluate, model: nn.Module, batches: Any, *args, **kwargs) -> dict:
    """``evaluate(model, batches, ...)`` with each rank on its slice; metrics all-reduced.

    A ``KeyboardInterrupt`` on any rank during its slice is raised on every rank, after
    the same collectives: the caller's handler then runs on all of them together.
    """
    world = world_size()
    if world == 1:
        return evaluate(model, batches, *args, **kwargs)
    sync_buffers(model)
    n, r = len(batches), rank()
    part = Shard(batches, n * r // world, n * (r + 1) // world)
    try:
        metrics, stop = evaluate(model, part, *args, **kwargs), None
    except KeyboardInterrupt as interrupt:  # "stop now" on this rank, perhaps on this one only
        metrics, stop = {}, interrupt
    # Every rank votes before any leaves: a rank that stopped alone would leave the others
    # waiting in the all-reduce below, and the caller saves with a collective.
    (stopped,) = agree(stop is not None)
    if stopped:
        raise stop if stop is not None else KeyboardInterrupt("another rank was stopped")
    return mean_metrics(metrics, len(part))


def gather_rank_states(rng: dict[str, Any], progress: dict | None) -> dict[str, Any]:
    """``{"ranks": [each rank's RNG state and epoch progress]}``; ``{}`` in one process.

    Every rank draws its own augmentation and counts its own loss, so an exact resume
    needs every rank's state, not only rank 0's. A collective: all ranks call it together.
    """
    if world_size() == 1:
        return {}
    states: list[Any] = [None] * world_size()
    dist.all_gather_object(states, {"rng": rng, "epoch_state": progress})
    return {"ranks": states}


def restore_rank_state(state: dict[str, Any], generator: torch.Generator) -> dict | None:
    """Restore this rank's RNG states from a checkpoint; return its epoch progress.

    After a change of world size the saved states do not map onto the ranks: every rank
    starts from rank 0's (a step still means one global batch), and the ranks > 0 are
    re-seeded so that their augmentation streams differ.
    """
    ranks = state.get("ranks")
    if ranks is not None and len(ranks) == world_size():
        restore_rng(ranks[rank()]["rng"], generator)
        return ranks[rank()]["epoch_state"]
    restore_rng(state["rng"], generator)
    if rank() > 0:
        generator.manual_seed(generator.initial_seed() + rank())
        torch.manual_seed(torch.initial_seed() + rank())
    return state["epoch_state"]


def share(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (the others pass None); the run's last collective.

    The barrier keeps rank 0 from exiting, and tearing down its side of the group, while a
    slower rank is still receiving: gloo can abort a process at exit in that case.
    """
    if world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    dist.barrier()
    return box[0]
