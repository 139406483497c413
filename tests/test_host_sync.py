"""Host synchronisations in the training loop, counted on CPU.

On a GPU every ``.item()``, ``if tensor``, ``int(tensor)`` or ``.cpu()`` makes the host wait
for the device, so a loop that reads a value per step runs one step at a time. These tests
count those reads (patched onto ``torch.Tensor``) while an epoch runs on CPU: the loop may
read only at its sync steps, once each, whatever the model, augmentation or schedule.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from cifar100.config.schema import AugmentConfig, ModelConfig, OptimConfig, layered_config
from cifar100.data.augment import mix_batch_on_device, one_hot
from cifar100.data.batches import ImageBatches
from cifar100.data.cifar import Split
from cifar100.data.preprocess import Preprocess
from cifar100.models import build_model
from cifar100.training.ema import ModelEma
from cifar100.training.engine import (
    EpochState,
    RunningSums,
    StepContext,
    TrainingDiverged,
    train_one_epoch,
)
from cifar100.training.optim import make_optimizer, make_scheduler

READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")
AUGMENT = AugmentConfig(flip=True, translate=2, rotation=5, zoom=0.1, contrast=0.1)


@pytest.fixture
def host_reads(monkeypatch) -> Counter:
    """Counts every call that turns a tensor into Python values (or a CPU copy)."""
    counts: Counter = Counter()
    for name in READS:
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _name=name, _original=original, **kwargs):
            counts[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    return counts


def _epoch_parts(images: int = 96, batch: int = 8):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    split = Split(
        torch.randint(0, 256, (images, 3, 32, 32), dtype=torch.uint8, generator=g),
        torch.arange(images) % 100,
        torch.arange(images) % 20,
    )
    batches = ImageBatches(
        split, Preprocess(32, (0.5,) * 3, (0.25,) * 3), torch.device("cpu"), AUGMENT
    )
    model = build_model(ModelConfig(name="cnn-fast", widths=(8, 16, 16, 16)))
    optim = OptimConfig(optimizer="sgd", lr=0.05, schedule="cosine", warmup_epochs=0.5)
    optimizer = make_optimizer(model.parameters(), optim)
    scheduler, _ = make_scheduler(optimizer, optim, 1, images // batch)
    ctx = StepContext(
        optimizer=optimizer,
        scheduler=scheduler,
        num_classes=100,
        label_smoothing=0.1,
        augment=AUGMENT,
        grad_clip=1.0,
        ema=ModelEma(model, 0.9),
    )
    return model, batches, ctx, torch.randperm(images, generator=g), batch


@pytest.mark.parametrize("every, reads", [(1, 12), (4, 3), (5, 3), (12, 1)])
def test_an_epoch_reads_the_device_once_per_sync_step(host_reads, every, reads):
    model, batches, ctx, order, batch = _epoch_parts()  # 12 steps
    paused: list[int] = []

    def on_pause(state: EpochState) -> bool:
        paused.append(state.step)
        return False

    train_one_epoch(
        model,
        batches,
        ctx,
        batch_size=batch,
        order=order,
        generator=torch.Generator().manual_seed(1),
        state=EpochState(),
        on_pause=on_pause,
        sync_every=every,
    )
    assert paused == list(range(1, 13))  # the hook still runs after every step
    assert sum(host_reads.values()) == reads, host_reads


def test_running_sums_match_python_floats_to_the_last_digit():
    """The device sums replace ``loss_sum += loss.item() * n``: same numbers, bit for bit."""
    losses = torch.rand(500, generator=torch.Generator().manual_seed(0)) * 5  # float32
    expected = 0.0
    sums = RunningSums(EpochState(), torch.device("cpu"))
    logits, labels = torch.zeros(37, 100), torch.zeros(37, dtype=torch.long)
    logits[:, 0] = 1.0  # every label (0) ranks first
    for loss in losses:
        expected += loss.item() * 37
        sums.add(loss, logits, labels)
    state = EpochState(step=500)
    sums.read_into(state)
    assert state.loss_sum == expected and state.seen == 500 * 37
    assert state.top1 == state.top5 == 500 * 37


def test_a_nan_loss_stops_at_the_next_sync_step_before_the_hook_sees_it():
    model, batches, ctx, order, batch = _epoch_parts()
    with torch.no_grad():
        model.classifier[1].bias.fill_(float("nan"))
    paused: list[int] = []
    with pytest.raises(TrainingDiverged, match="loss became nan"):
        train_one_epoch(
            model,
            batches,
            ctx,
            batch_size=batch,
            order=order,
            generator=torch.Generator(),
            state=EpochState(),
            on_pause=lambda state: paused.append(state.step) or False,
            sync_every=3,
        )
    assert paused == [1, 2]  # step 3 read the NaN: no checkpoint can be saved with it


@pytest.mark.parametrize("mixup, cutmix", [(0.8, 0.0), (0.0, 1.0), (0.8, 1.0)])
def test_mixup_and_cutmix_on_a_device_draw_without_reading_back(host_reads, mixup, cutmix):
    images, labels = torch.rand(16, 3, 32, 32), torch.arange(16)
    targets = one_hot(labels, 100, 0.1)
    generator = torch.Generator().manual_seed(0)
    config = AugmentConfig(mixup_alpha=mixup, cutmix_alpha=cutmix)
    results = [mix_batch_on_device(images, targets, config, generator) for _ in range(20)]
    assert sum(host_reads.values()) == 0, host_reads
    for mixed, soft in results:
        assert mixed.shape == images.shape and mixed.min() >= 0 and mixed.max() <= 1
        assert torch.allclose(soft.sum(1), torch.ones(16))


def test_cutmix_on_a_device_pastes_the_area_its_targets_say():
    images = torch.zeros(8, 3, 32, 32)
    images[4:] = 1.0  # two kinds of images, so a pasted patch shows
    targets = one_hot(torch.arange(8), 100)
    generator = torch.Generator().manual_seed(3)
    for _ in range(10):
        mixed, soft = mix_batch_on_device(
            images, targets, AugmentConfig(cutmix_alpha=1.0), generator
        )
        lam = soft[torch.arange(8), torch.arange(8)]  # weight of each image's own label
        changed = (mixed != images).float().mean(dim=(1, 2, 3))
        partner_differs = changed > 0
        assert torch.allclose(changed[partner_differs], 1 - lam[partner_differs])


def test_ranks_vote_only_at_sync_steps(fake_data_dir, tmp_path, monkeypatch):
    from cifar100.runtime import distributed
    from cifar100.training.train import train

    votes: list[tuple[bool, ...]] = []

    def agree(*flags: bool) -> tuple[bool, ...]:
        votes.append(flags)
        return flags

    monkeypatch.setattr(distributed, "agree", agree)
    config = layered_config(
        "quick",
        overrides={
            "model": {"widths": [8, 8, 8, 8]},
            "data": {"data_dir": str(fake_data_dir)},
            "train": {"epochs": 1, "batch_size": 50, "eval_batch_size": 200, "sync_every": 5},
        },
    )
    train(config, tmp_path / "run", test_set=False)
    # 800 images / 50 = 16 steps: votes at steps 5, 10, 15 and 16 (stop, save due), then
    # one at the epoch's end (is a timed last.pt due?)
    assert [len(vote) for vote in votes] == [2, 2, 2, 2, 1]
