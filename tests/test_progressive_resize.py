"""train.resize_start / resize_epochs: progressive resizing of a model trained from scratch."""

from __future__ import annotations

import json

import pytest
import torch

from cifar100.cli import main
from cifar100.config.schema import ConfigError
from cifar100.data.augment import ResizeSchedule, resize_batch
from cifar100.recipes.flags import from_flags
from cifar100.training import engine
from cifar100.training.engine import StepContext, epoch_context


def test_the_size_rises_in_steps_of_four_and_the_last_epochs_are_full_size():
    schedule = ResizeSchedule(start=16, epochs=4, full=32)
    assert [schedule.size_at(e) for e in range(6)] == [16, 20, 24, 28, 32, 32]
    assert [ResizeSchedule(24, 3, 32).size_at(e) for e in range(4)] == [24, 24, 28, 32]
    odd = ResizeSchedule(22, 2, 32)  # a start off the 4 px grid is kept, never undercut
    assert [odd.size_at(e) for e in range(3)] == [22, 24, 32]


def test_resize_batch_shrinks_without_aliasing_and_keeps_full_size_batches():
    images = torch.rand(2, 3, 32, 32)
    assert resize_batch(images, 32) is images
    small = resize_batch(images, 24)
    assert small.shape == (2, 3, 24, 24)
    assert small.is_contiguous(memory_format=torch.channels_last)
    # A one-pixel checkerboard is all aliasing: antialiasing averages it to grey, plain
    # bilinear sampling would keep a pattern of full-contrast pixels.
    board = (torch.arange(32)[:, None] + torch.arange(32)[None, :]) % 2
    board = board.float().expand(1, 3, 32, 32)
    assert resize_batch(board, 16).std() < 0.05


def test_epoch_context_sets_each_epochs_size_and_nothing_else():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    ctx = StepContext(
        optimizer=optimizer,
        scheduler=None,
        num_classes=100,
        label_smoothing=0.1,
        augment=None,
        resize=ResizeSchedule(24, 2, 32),
    )
    assert [epoch_context(ctx, e, 4).input_size for e in range(4)] == [24, 28, 32, 32]
    assert epoch_context(ctx, 0, 4).optimizer is optimizer
    plain = StepContext(
        optimizer=optimizer, scheduler=None, num_classes=100, label_smoothing=0.1, augment=None
    )
    assert epoch_context(plain, 0, 4).input_size is None


def test_a_run_trains_its_first_epochs_shrunk_and_records_the_sizes(
    fake_data_dir, tmp_path, monkeypatch
):
    seen = []

    def spy(images, size):  # the real resize, the shapes it was asked for noted
        seen.append(size)
        return real(images, size)

    real = engine.resize_batch
    monkeypatch.setattr(engine, "resize_batch", spy)
    run_dir = tmp_path / "run"
    sets = ["model.widths=[8,16,32,32]", "train.resize_start=16", "train.resize_epochs=2"]
    argv = ["train", "--preset", "quick", "--epochs", "3", "--data-dir", str(fake_data_dir)]
    argv += ["--run-dir", str(run_dir), *[a for s in sets for a in ("--set", s)]]
    assert main(argv) == 0
    steps = len(seen) // 3
    assert steps > 0 and seen == [16] * steps + [24] * steps + [32] * steps
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["train_input_size"] for row in rows] == [16, 24, 32]
    assert (run_dir / "results.json").exists()  # evaluated at full size, as every run


@pytest.mark.parametrize(
    ("preset", "sets", "message"),
    [
        ("cnn-fast", ["train.resize_start=32", "train.resize_epochs=2"], "not smaller than"),
        ("cnn-fast", ["train.resize_start=24", "train.resize_epochs=15"], "reach full size"),
        ("cnn-fast", ["train.resize_epochs=3"], "train.resize_start is off"),
        ("cnn-fast", ["train.resize_start=24"], "train.resize_epochs.*is 0"),
        ("cnn-fast", ["train.resize_start=4", "train.resize_epochs=2"], r"in \[8, 1024\]"),
        ("mobilenetv2", ["train.resize_start=96", "train.resize_epochs=2"], "from scratch"),
    ],
)
def test_settings_that_cannot_work_are_refused_with_the_reason(preset, sets, message):
    with pytest.raises(ConfigError, match=message):
        from_flags(preset, sets=sets)


def test_a_valid_schedule_resolves():
    config = from_flags("cnn-fast", sets=["train.resize_start=24", "train.resize_epochs=7"])
    assert (config.train.resize_start, config.train.resize_epochs) == (24, 7)
