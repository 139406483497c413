"""The training machinery's parts: learning-rate schedules, EMA (with resume), early
stopping, and validation sharded unevenly over processes."""

from __future__ import annotations

import json
import math
import os
import socket
from pathlib import Path

import pytest
import torch
from torch import nn

from cifar100.cli import main
from cifar100.config.schema import OptimConfig
from cifar100.evaluation.inference import score
from cifar100.runtime import distributed
from cifar100.runtime.checkpoint import load_checkpoint
from cifar100.training.ema import ModelEma
from cifar100.training.optim import make_optimizer, make_scheduler, restore_scheduler

STEPS, EPOCHS = 10, 4  # steps per epoch, epochs


def _lrs(config: OptimConfig, epochs: int = EPOCHS, losses=None) -> list[float]:
    """The learning rate of every step (per-step schedules) or epoch (plateau)."""
    model = nn.Linear(2, 2)
    optimizer = make_optimizer(model.parameters(), config)
    scheduler, per_step = make_scheduler(optimizer, config, epochs, STEPS)
    lrs = []
    for step in range(epochs * STEPS if per_step else len(losses)):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step() if per_step else scheduler.step(losses[step])
    return lrs


def test_one_cycle_ramps_up_then_falls_linearly_to_the_floor():
    lrs = _lrs(OptimConfig(optimizer="sgd", lr=1.0, schedule="onecycle", min_lr=0.01))
    warmup = STEPS  # a quarter of the 4 epochs when warmup_epochs is 0
    assert lrs[:warmup] == pytest.approx([(s + 1) / warmup for s in range(warmup)])
    assert max(lrs) == pytest.approx(1.0) and lrs.index(max(lrs)) == warmup - 1
    decay = lrs[warmup:]
    steps = [a - b for a, b in zip(decay, decay[1:], strict=False) if b > 0.01]
    assert steps == pytest.approx([1 / (EPOCHS * STEPS - warmup)] * len(steps))  # linear
    assert lrs[-1] == pytest.approx(max(1 - (EPOCHS * STEPS - 1 - warmup) / 30, 0.01))


def test_cosine_with_warm_up():
    lrs = _lrs(OptimConfig(lr=0.1, schedule="cosine", warmup_epochs=1, min_lr=0.001))
    assert lrs[:STEPS] == pytest.approx([0.1 * (s + 1) / STEPS for s in range(STEPS)])
    total = (EPOCHS - 1) * STEPS
    for step in range(STEPS, EPOCHS * STEPS):
        progress = (step - STEPS) / total
        expected = 0.001 + (0.1 - 0.001) * 0.5 * (1 + math.cos(math.pi * progress))
        assert lrs[step] == pytest.approx(expected)
    middle = lrs[STEPS + total // 2]
    assert middle == pytest.approx((0.1 + 0.001) / 2)  # half way down at half the decay


def test_constant_schedule_warms_up_then_holds():
    lrs = _lrs(OptimConfig(lr=0.5, schedule="constant", warmup_epochs=0.5))
    assert lrs[:5] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])
    assert set(lrs[5:]) == {0.5}


def test_plateau_halves_after_patience_epochs_without_improvement():
    losses = [1.0, 0.9, 0.95, 0.95, 0.95, 0.8, 0.85, 0.85, 0.85, 0.85]
    lrs = _lrs(
        OptimConfig(lr=1.0, schedule="plateau", plateau_factor=0.5, plateau_patience=2, min_lr=0.3),
        losses=losses,
    )
    # Epochs 3-5 fail to beat 0.9: the third bad one halves; epoch 6 improves (reset);
    # 7-9 halve again, but not below min_lr.
    assert lrs == [1.0, 1.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.5, 0.3]


def test_restored_schedule_follows_a_longer_run():
    """--resume --epochs N: the schedule is the N-epoch one from the step reached on."""
    config = OptimConfig(optimizer="sgd", lr=1.0, schedule="cosine", min_lr=0.0)
    model = nn.Linear(2, 2)
    optimizer = make_optimizer(model.parameters(), config)
    short, _ = make_scheduler(optimizer, config, 2, STEPS)
    for _ in range(2 * STEPS):
        optimizer.step()
        short.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0)  # the end of 2 epochs
    saved_opt, saved = optimizer.state_dict(), short.state_dict()

    def resumed(epochs: int):  # the order training uses: build, then load the states
        optimizer = make_optimizer(model.parameters(), config)
        scheduler, _ = make_scheduler(optimizer, config, epochs, STEPS)
        optimizer.load_state_dict(saved_opt)
        restore_scheduler(scheduler, saved, optimizer)
        return optimizer, scheduler

    optimizer, longer = resumed(4)
    assert longer.last_epoch == 2 * STEPS
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5)  # half way in 4 epochs
    optimizer.step()
    longer.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(
        0.5 * (1 + math.cos(math.pi * (2 * STEPS + 1) / (4 * STEPS)))
    )
    optimizer, same = resumed(2)  # an unchanged config: exactly where it was
    assert vars(same.lr_lambdas[0]) == saved["lr_lambdas"][0]
    assert optimizer.param_groups[0]["lr"] == saved_opt["param_groups"][0]["lr"]


def test_ema_averages_weights_and_copies_integer_buffers():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    ema = ModelEma(model, decay=0.9)
    start = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    model[1].num_batches_tracked += 5
    ema.update(model)
    assert torch.allclose(ema.model[0].weight, start + 0.1)  # 0.9 old + 0.1 new
    assert ema.model[1].num_batches_tracked == 5  # counters are copied, not averaged
    assert not any(p.requires_grad for p in ema.model.parameters())


CONSTANT = [
    *["--set", "optim.schedule=constant", "--set", "optim.warmup_epochs=0"],
    *[
        "--set",
        "train.ema_decay=0.9",
        "--preset",
        "quick",
        "--set",
        "train.batch_size=50",
        "--set",
        "model.widths=8,16,32,32",
        "--set",
        "train.eval_batch_size=100",
    ],
]


def test_ema_survives_a_resume_exactly(fake_data_dir, tmp_path):
    """Two epochs straight equal one epoch, then --resume --epochs 2 (EMA included)."""
    straight, stepped = tmp_path / "straight", tmp_path / "stepped"
    common = ["train", *CONSTANT, "--data-dir", str(fake_data_dir)]
    assert main([*common, "--epochs", "2", "--run-dir", str(straight)]) == 0
    assert main([*common, "--epochs", "1", "--run-dir", str(stepped)]) == 0
    first = load_checkpoint(stepped / "checkpoints" / "last.pt")
    best = load_checkpoint(stepped / "checkpoints" / "best.pt")["model"]
    assert all(torch.equal(best[k], first["ema"][k]) for k in best)  # the EMA is evaluated
    assert not all(torch.equal(best[k], first["model"][k]) for k in best)
    assert main(["train", "--resume", str(stepped), "--epochs", "2"]) == 0
    a = load_checkpoint(straight / "checkpoints" / "last.pt")
    b = load_checkpoint(stepped / "checkpoints" / "last.pt")
    assert a["ema"] is not None and a["epoch"] == b["epoch"] == 2
    for key in a["ema"]:
        assert torch.equal(a["ema"][key], b["ema"][key]), key
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert not all(torch.equal(a["ema"][k], a["model"][k]) for k in a["ema"])  # averaged
    rows = [
        [
            {k: v for k, v in json.loads(line).items() if k != "elapsed_s"}
            for line in (d / "metrics.jsonl").read_text().splitlines()
        ]
        for d in (straight, stepped)
    ]
    assert rows[0] == rows[1]


def test_early_stopping_ends_after_patience_epochs(fake_data_dir, tmp_path, monkeypatch, capsys):
    """Validation top-1 0.5, 0.4, 0.45, 0.3: with patience 2 the run stops after epoch 3."""
    scores = iter([0.5, 0.4, 0.45, 0.3, 0.9, 0.9])

    def fake_validation(evaluate_fn, model, batches, *args, **kwargs):
        return {"loss": 1.0, "top1": next(scores), "top5": 0.9}

    monkeypatch.setattr(distributed, "evaluate_sharded", fake_validation)
    run_dir = tmp_path / "early"
    assert (
        main(
            [
                "train",
                *CONSTANT,
                "--epochs",
                "6",
                "--set",
                "train.early_stopping=2",
                "--data-dir",
                str(fake_data_dir),
                "--run-dir",
                str(run_dir),
                "--json",
            ]
        )
        == 0
    )
    results = json.loads(capsys.readouterr().out)
    rows = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 3 and results["best_epoch"] == 1 and results["val_top1"] == 0.5
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["bad_epochs"] == 2
    assert main(["train", "--resume", str(run_dir), "--epochs", "8"]) == 1
    assert "stopped early" in capsys.readouterr().err


class _Batches:
    """A batch source of 7 random feature rows: 7 does not split evenly over 2 ranks."""

    def __init__(self):
        generator = torch.Generator().manual_seed(0)
        self.features = torch.randn(7, 4, generator=generator)
        self.labels = torch.tensor([0, 1, 2, 3, 4, 5, 1])
        self.device = torch.device("cpu")

    def __len__(self) -> int:
        return len(self.labels)

    def get(self, indices, generator=None, flip=False, shift=0):
        return self.features[indices]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(4, 6)


def _rank(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        metrics = distributed.evaluate_sharded(score, _model(), _Batches(), 2)
        Path(out, f"rank{rank}.json").write_text(json.dumps(metrics))
    finally:
        dist.destroy_process_group()


def test_uneven_validation_shards_match_one_process(tmp_path):
    """7 images on 2 ranks (3 + 4): the image-weighted mean equals the single-process one."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.multiprocessing.spawn(_rank, args=(port, str(tmp_path)), nprocs=2, join=True)
    single = score(_model(), _Batches(), 2)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]  # every rank takes the same decisions
    for key in ("loss", "top1", "top5"):
        assert ranks[0][key] == pytest.approx(single[key], rel=1e-6), key
    halves = [score(_model(), distributed.Shard(_Batches(), a, b), 2) for a, b in ((0, 3), (3, 7))]
    assert halves[0]["top1"] != halves[1]["top1"] or halves[0]["loss"] != halves[1]["loss"]
    plain_mean = sum(h["loss"] for h in halves) / 2
    assert single["loss"] != pytest.approx(plain_mean)  # an unweighted mean would be wrong
