"""augment.mix_off_epochs: MixUp/CutMix stop for a run's last epochs (timm's mixup-off)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from cifar100.cli import main
from cifar100.config.schema import AugmentConfig, ConfigError
from cifar100.recipes.flags import from_flags
from cifar100.training import engine
from cifar100.training.distill.teacher_cache import cache_key
from cifar100.training.engine import StepContext, epoch_context


def context(augment: AugmentConfig | None) -> StepContext:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    return StepContext(
        optimizer=optimizer, scheduler=None, num_classes=100, label_smoothing=0.1, augment=augment
    )


def test_the_last_epochs_have_no_mixing_and_everything_else_is_kept():
    ctx = context(AugmentConfig(translate=2, mixup_alpha=0.2, cutmix_alpha=1.0, mix_off_epochs=2))
    assert [epoch_context(ctx, e, 5) is ctx for e in range(5)] == [True] * 3 + [False] * 2
    late = epoch_context(ctx, 4, 5)
    assert (late.augment.mixup_alpha, late.augment.cutmix_alpha) == (0.0, 0.0)
    assert late.augment.translate == 2 and late.optimizer is ctx.optimizer
    plain = context(AugmentConfig(mixup_alpha=0.2))  # mix_off_epochs 0: mixes to the end
    assert all(epoch_context(plain, e, 5) is plain for e in range(5))
    assert epoch_context(context(None), 4, 5).augment is None  # transfer stage 1 features


def test_a_run_mixes_until_its_last_epochs(fake_data_dir, tmp_path, monkeypatch):
    seen = []

    def spy(images, targets, config, generator):  # the real mix_batch, its config noted
        seen.append(config.cutmix_alpha)
        return real(images, targets, config, generator)

    real = engine.mix_batch
    monkeypatch.setattr(engine, "mix_batch", spy)
    argv = ["train", "--preset", "quick", "--epochs", "3", "--data-dir", str(fake_data_dir)]
    sets = ["model.widths=[8,16,32,32]", "augment.cutmix_alpha=1.0", "augment.mix_off_epochs=1"]
    assert (
        main([*argv, "--run-dir", str(tmp_path / "run"), *[a for s in sets for a in ("--set", s)]])
        == 0
    )
    steps = len(seen) // 3
    assert steps > 0 and seen == [1.0] * (2 * steps) + [0.0] * steps


def test_mix_off_epochs_without_mixing_is_refused():
    with pytest.raises(ConfigError, match="augment.mix_off_epochs.*both augment.mixup_alpha"):
        from_flags("cnn-fast", sets=["augment.mix_off_epochs=2"])
    with pytest.raises(ConfigError, match="augment.mix_off_epochs"):
        from_flags("cnn-fast", sets=["augment.mixup_alpha=0.2", "augment.mix_off_epochs=-1"])


def test_the_teacher_cache_key_ignores_when_mixing_stops():
    images = torch.zeros(4, 3, 32, 32, dtype=torch.uint8)
    mixing = AugmentConfig(cutmix_alpha=1.0)
    keys = [
        cache_key("sha", images, dataclasses.replace(mixing, mix_off_epochs=n), 2, 0)
        for n in (0, 3)
    ]
    assert keys[0] == keys[1]
