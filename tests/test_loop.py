"""The loop (``cifar100.training.loop``): it trains whatever stages a model's registry entry names
(its plan), a run is a pure function of its config (same seed, same numbers to the last
digit), and checkpoints of older versions still resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from cifar100 import models
from cifar100.config.schema import layered_config
from cifar100.data.batches import ImageBatches
from cifar100.data.cifar import MEAN, STD
from cifar100.models import REGISTRY, ModelSpec, register
from cifar100.runtime.checkpoint import rng_state
from cifar100.training import plans
from cifar100.training.engine import EpochState, StepContext
from cifar100.training.loop import Run, Stage, restore_stage
from cifar100.training.plans import PLANS, register_plan
from cifar100.training.train import train

TINY = {
    "model": {"widths": [8, 16, 32, 32]},
    "train": {"epochs": 1, "batch_size": 50, "eval_batch_size": 200},
}
TIMINGS = (
    "elapsed_s",
    "train_minutes",
    "train_seconds",
    "wall_seconds",
    "time_to_val",
    "process",
    "run_dir",
)


def _config(data_dir: Path, **overrides):
    return layered_config(
        "quick", overrides={**TINY, "data": {"data_dir": str(data_dir)}, **overrides}
    )


def _metrics(run_dir: Path) -> tuple[list[dict], dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    results = json.loads((run_dir / "results.json").read_text())
    drop = lambda d: {k: v for k, v in d.items() if k not in TIMINGS}  # noqa: E731
    return [drop(row) for row in rows], drop(results)


def test_same_seed_gives_identical_metrics(fake_data_dir, tmp_path):
    """Two runs of one config agree in every metric; a third with another seed does not
    (so the comparison can fail). Guards refactors of the loop: "no change in behaviour"."""
    config = _config(fake_data_dir, train={**TINY["train"], "epochs": 2})
    for name in ("a", "b"):
        train(config, tmp_path / name)
    first = _metrics(tmp_path / "a")
    assert first == _metrics(tmp_path / "b")
    assert [row["epoch"] for row in first[0]] == [1, 2]
    train(_config(fake_data_dir, train={**TINY["train"], "seed": 1}), tmp_path / "c")
    assert _metrics(tmp_path / "c")[0][0] != first[0][0]


def _linear(config, num_classes: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, num_classes))


@pytest.fixture
def toy_model(monkeypatch):
    """A model the loop has never heard of, with a two-stage plan of its own; registered
    through the public functions, in copies of both tables that the test throws away."""
    monkeypatch.setattr(models, "REGISTRY", dict(REGISTRY))
    monkeypatch.setattr(plans, "PLANS", dict(PLANS))
    trained: list[tuple[str, int]] = []

    def two_stages(run: Run):
        torch.manual_seed(run.config.train.seed)
        model = models.build_model(run.config.model).to(run.device)
        train_batches = ImageBatches(run.splits.train, run.preprocess, run.device)
        val_batches = ImageBatches(run.splits.val, run.preprocess, run.device)
        for name, lr, epochs in (("warm", 0.05, 1), ("main", 0.01, 2)):
            ctx = StepContext(
                optimizer=torch.optim.SGD(model.parameters(), lr=lr),
                scheduler=None,
                num_classes=100,
                label_smoothing=0.0,
                augment=None,
            )
            stage = Stage(name, model, epochs, 50, train_batches, val_batches, ctx)
            yield stage
            trained.append((stage.name, stage.epoch))  # the loop ran it before coming back

    register_plan("toy-two-stage", two_stages)
    register(
        ModelSpec(
            name="toy-linear",
            builder=_linear,
            input_size=32,
            mean=MEAN,
            std=STD,
            pretrained=False,
            description="one linear layer",
            plan="toy-two-stage",
        )
    )
    return trained


def test_a_registered_plan_is_what_the_loop_runs(toy_model, fake_data_dir, tmp_path):
    config = _config(fake_data_dir, model={"name": "toy-linear"})
    results = train(config, tmp_path / "run")
    rows, _ = _metrics(tmp_path / "run")
    assert [(row["stage"], row["epoch"]) for row in rows] == [("warm", 1), ("main", 1), ("main", 2)]
    assert toy_model == [("warm", 1), ("main", 2)]
    assert results["model"] == "toy-linear" and results["best_stage"] in ("warm", "main")
    assert results["parameters"] == 3 * 32 * 32 * 100 + 100  # the toy network was tested


def test_an_unknown_plan_is_a_clear_error(toy_model):
    with pytest.raises(ValueError, match="unknown stage plan 'nope'"):
        plans.stage_plan("nope")


def test_a_checkpoint_from_before_issue_14_still_resumes():
    """Its epoch progress carries the removed, always empty ``extra`` field."""
    model = nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    stage = Stage(
        "main",
        model,
        3,
        2,
        None,
        None,
        StepContext(
            optimizer=optimizer, scheduler=None, num_classes=2, label_smoothing=0.0, augment=None
        ),
    )
    generator = torch.Generator()
    progress = {"step": 3, "loss_sum": 1.5, "top1": 2, "top5": 4, "seen": 6, "extra": {}}
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": None,
        "ema": None,
        "epoch": 1,
        "best_top1": 0.25,
        "bad_epochs": 0,
        "rng": rng_state(generator),
        "epoch_state": progress,
    }
    assert restore_stage(stage, state, generator) == EpochState(3, 1.5, 2, 4, 6)
    assert (stage.epoch, stage.best_top1) == (1, 0.25)
