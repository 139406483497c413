"""The weight EMA's decay warm-up (``cifar100.training.ema``): early steps follow the warm-up, the
count survives a checkpoint, and a warm-up without an EMA is refused."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cifar100.config.schema import ConfigError
from cifar100.recipes.flags import from_flags
from cifar100.runtime.checkpoint import rng_state
from cifar100.training.ema import ModelEma, warmup_decay
from cifar100.training.engine import StepContext
from cifar100.training.loop import Stage, restore_stage


def test_warmup_decays_start_low_and_rise_to_the_decay():
    tf = [warmup_decay(0.99, "tf", t) for t in range(1000)]
    assert tf[:3] == pytest.approx([1 / 10, 2 / 11, 3 / 12])
    assert tf[-1] == 0.99 and all(a <= b for a, b in zip(tf, tf[1:], strict=False))
    timm = [warmup_decay(0.99, "timm", t) for t in range(1000)]
    assert timm[0] == 0.0 and timm[1] == pytest.approx(1 - 2**-0.75)
    assert timm[-1] == 0.99
    assert {warmup_decay(0.99, None, t) for t in (0, 5, 500)} == {0.99}


@pytest.mark.parametrize("warmup", [None, "tf", "timm"])
def test_early_updates_follow_the_warmup(warmup):
    """The weight moves 0 -> 1 at once; after each update the average sits where the
    warm-up's decays put it: product of the decays away from the live weight."""
    model = nn.Linear(1, 1, bias=False)
    nn.init.zeros_(model.weight)
    ema = ModelEma(model, 0.999, warmup)
    with torch.no_grad():
        model.weight.fill_(1.0)
    remaining = 1.0  # the initial weight's share of the average
    for t in range(5):
        assert ema.current_decay == warmup_decay(0.999, warmup, t)
        ema.update(model)
        remaining *= warmup_decay(0.999, warmup, t)
        assert ema.model.weight.item() == pytest.approx(1.0 - remaining, abs=1e-6)
    assert ema.updates == 5
    if warmup is None:
        assert ema.model.weight.item() < 0.01  # the initialisation still dominates
    else:
        assert ema.model.weight.item() > 0.6  # the warm-up forgot it


def _stage(ema: ModelEma, model: nn.Module) -> Stage:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return Stage(
        "main",
        model,
        3,
        2,
        None,
        None,
        StepContext(
            optimizer=optimizer,
            scheduler=None,
            num_classes=2,
            label_smoothing=0.0,
            augment=None,
            ema=ema,
        ),
    )


@pytest.mark.parametrize(("saved", "expected"), [(7, 7), (None, 0)])
def test_a_resume_continues_the_warmup_where_it_stood(saved, expected):
    """The count comes back from the checkpoint (older checkpoints have none: 0)."""
    model = nn.Linear(4, 2)
    stage = _stage(ModelEma(model, 0.99, "tf"), model)
    state = {
        "model": model.state_dict(),
        "optimizer": stage.ctx.optimizer.state_dict(),
        "scheduler": None,
        "ema": model.state_dict(),
        "epoch": 1,
        "best_top1": 0.25,
        "bad_epochs": 0,
        "rng": rng_state(torch.Generator()),
        "epoch_state": None,
    }
    if saved is not None:
        state["ema_updates"] = saved
    restore_stage(stage, state, torch.Generator())
    assert stage.ctx.ema.updates == expected


def test_a_warmup_without_an_ema_is_refused():
    with pytest.raises(ConfigError, match="train.ema_warmup .*ema_decay is off"):
        from_flags("quick", sets=["train.ema_warmup=tf"])
    config = from_flags("quick", sets=["train.ema_warmup=tf", "train.ema_decay=0.99"])
    assert config.train.ema_warmup == "tf"
    with pytest.raises(ConfigError, match="unknown train.ema_warmup 'linear'"):
        from_flags("quick", sets=["train.ema_warmup=linear", "train.ema_decay=0.99"])
