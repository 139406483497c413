"""The weight EMA (``cifar100.training.ema``): early steps follow the warm-up, the count
survives a checkpoint, a warm-up without an EMA is refused, and an EMA sized to the run
spans the same share of a short run as of a long one."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cifar100.config.schema import ConfigError
from cifar100.recipes.flags import from_flags
from cifar100.runtime.checkpoint import rng_state
from cifar100.training.ema import ModelEma, span_decay, warmup_decay
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


@pytest.mark.parametrize("warmup", [None, "tf", "timm", "mean"])
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


def _ramp_average(ema: ModelEma, steps: int) -> float:
    """The average after ``steps`` updates of a weight that moves from 0 to 1 in equal
    steps, as a long run's weights drift away from their initialisation."""
    model = nn.Linear(1, 1, bias=False)
    for t in range(1, steps + 1):
        with torch.no_grad():
            model.weight.fill_(t / steps)
        ema.update(model)
    return ema.model.weight.item()


@pytest.mark.parametrize("steps", [200, 2000])
def test_an_ema_sized_to_the_run_averages_its_last_share(steps):
    """An exponential average lags a ramp by its window: sized to 5% of the run it sits at
    ~0.95 whatever the run's length; a fixed 0.999 decay is still far behind in the short
    run (the lag the GPU's short runs saw)."""
    decay = span_decay(0.05, steps)
    assert 1 / (1 - decay) == pytest.approx(0.05 * steps)
    zero = nn.Linear(1, 1, bias=False)
    nn.init.zeros_(zero.weight)
    sized = _ramp_average(ModelEma(zero, decay, "mean"), steps)
    assert sized == pytest.approx(0.95, abs=0.01)
    if steps == 200:
        assert _ramp_average(ModelEma(zero, 0.999), steps) < 0.2


def test_the_mean_warmup_is_the_plain_mean_until_the_span():
    model = nn.Linear(1, 1, bias=False)
    nn.init.constant_(model.weight, 7.0)  # the initialisation: forgotten at once
    ema = ModelEma(model, span_decay(1.0, 100), "mean")
    values = [1.0, 2.0, 3.0, 4.0]
    for value in values:
        with torch.no_grad():
            model.weight.fill_(value)
        ema.update(model)
    assert ema.model.weight.item() == pytest.approx(sum(values) / len(values))


def test_ema_span_settings_are_checked():
    config = from_flags("quick", sets=["train.ema_span=0.05"])
    assert config.train.ema_span == 0.05 and config.train.ema_decay is None
    with pytest.raises(ConfigError, match="train.ema_span=0.05 and train.ema_decay=0.99: choose"):
        from_flags("quick", sets=["train.ema_span=0.05", "train.ema_decay=0.99"])
    with pytest.raises(ConfigError, match="train.ema_span must be"):
        from_flags("quick", sets=["train.ema_span=0"])
    with pytest.raises(ConfigError, match="train.ema_span .*keep no moving average"):
        from_flags("mobilenetv2", sets=["train.ema_span=0.05"])
    assert from_flags("resnet18-gpu").train.ema_span == 0.05  # the GPU recipe uses it


def test_a_run_with_ema_span_sizes_its_average_from_its_steps(fake_data_dir, tmp_path, monkeypatch):
    from cifar100.training import plans
    from cifar100.training.train import train

    made = []

    class Recorded(ModelEma):
        def __init__(self, model, decay, warmup=None):
            super().__init__(model, decay, warmup)
            made.append((decay, warmup))

    monkeypatch.setattr(plans, "ModelEma", Recorded)
    config = from_flags(
        "quick",
        epochs=2,
        data_dir=str(fake_data_dir),
        sets=["train.ema_span=0.25", "model.widths=[8,16,32,32]", "train.batch_size=100"],
    )
    train(config, tmp_path / "run")
    steps = 2 * (800 // 100)  # two epochs of the fake train split's 800 images
    assert made == [(span_decay(0.25, steps), "mean")]
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert last["ema_updates"] == steps
