"""``optim.optimizer=muon``: Muon for the convolution filters, SGD for the rest, one schedule,
one checkpoint that resumes exactly."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from cifar100.cli import main
from cifar100.config.schema import OptimConfig
from cifar100.models.cnn import FastCNN
from cifar100.runtime.checkpoint import load_checkpoint
from cifar100.training.optim import (
    MuonSgd,
    load_optimizer_state,
    make_optimizer,
    make_scheduler,
    orthogonalise,
)

MUON = OptimConfig(optimizer="muon", lr=0.1, weight_decay=5e-4, muon_lr=0.2, muon_momentum=0.6)


def _tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    return FastCNN(num_classes=10, widths=(8, 16, 16, 16))


def _train_steps(model: nn.Module, optimizer, steps: int, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        images = torch.randn(8, 3, 32, 32, generator=generator)
        labels = torch.randint(0, 10, (8,), generator=generator)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()


@pytest.mark.parametrize("shape", [(16, 72), (72, 16), (32, 288)])
def test_orthogonalise_pushes_every_singular_value_near_one(shape):
    matrix = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    matrix[0] *= 100  # one dominant direction: a raw step would be mostly that one
    values = torch.linalg.svdvals(orthogonalise(matrix))
    assert values.min() > 0.6 and values.max() < 1.25


def test_filters_take_muon_and_everything_else_sgd():
    model = _tiny_cnn()
    optimizer = make_optimizer(model.parameters(), MUON)
    assert isinstance(optimizer, MuonSgd)
    muon = [g for g in optimizer.param_groups if g["muon"]]
    sgd = [g for g in optimizer.param_groups if not g["muon"]]
    filters = {id(m.weight) for m in model.modules() if isinstance(m, nn.Conv2d)}
    assert len(muon) == 1 and {id(p) for p in muon[0]["params"]} == filters
    assert muon[0]["lr"] == 0.2 and muon[0]["momentum"] == 0.6
    rest = {id(p) for g in sgd for p in g["params"]}
    assert rest == {id(p) for p in model.parameters()} - filters
    head = model.classifier[1].weight
    decayed = [g for g in sgd if any(p is head for p in g["params"])]
    assert decayed[0]["weight_decay"] == 5e-4  # the head's weights decay, BN and biases not
    assert all(g["weight_decay"] == 0 for g in optimizer.param_groups if g is not decayed[0])


def test_a_muon_step_moves_a_filter_bank_by_its_orthogonalised_gradient():
    conv = nn.Conv2d(4, 6, 3, bias=False)
    conv.weight.grad = torch.randn_like(conv.weight)
    optimizer = make_optimizer(conv.parameters(), MUON)
    before = conv.weight.detach().clone()
    optimizer.step()
    kept = before * (6**0.5 / before.norm())  # the bank's norm is held at sqrt(out channels)
    step = (kept - conv.weight.detach()).reshape(6, -1) / 0.2
    # First step, Nesterov: the update is (1 + momentum) x grad, orthogonalised as (6, 36).
    expected = orthogonalise(conv.weight.grad.reshape(6, -1) * 1.6)
    assert torch.allclose(step, expected, atol=1e-5)


def test_the_sgd_part_steps_exactly_as_torch_sgd():
    torch.manual_seed(0)
    ours, theirs = nn.Linear(5, 3), nn.Linear(5, 3)
    theirs.load_state_dict(ours.state_dict())
    mine = make_optimizer(ours.parameters(), MUON)
    sgd = torch.optim.SGD(
        [
            {"params": [theirs.weight], "weight_decay": 5e-4},
            {"params": [theirs.bias], "weight_decay": 0.0},
        ],
        lr=0.1,
        momentum=0.9,
        nesterov=True,
    )
    for step in range(3):
        x = torch.randn(4, 5, generator=torch.Generator().manual_seed(step))
        for model, optimizer in ((ours, mine), (theirs, sgd)):
            optimizer.zero_grad()
            model(x).square().sum().backward()
            optimizer.step()
    assert torch.equal(ours.weight, theirs.weight) and torch.equal(ours.bias, theirs.bias)


def test_the_schedule_scales_muon_and_sgd_alike():
    optimizer = make_optimizer(_tiny_cnn().parameters(), MUON)
    config = OptimConfig(**{**vars(MUON), "schedule": "onecycle", "warmup_epochs": 1})
    scheduler, per_step = make_scheduler(optimizer, config, epochs=4, steps_per_epoch=5)
    assert per_step
    base = [g["initial_lr"] for g in optimizer.param_groups]  # the lr before the schedule
    for _ in range(12):
        optimizer.step()
        scheduler.step()
    factors = {round(g["lr"] / b, 12) for g, b in zip(optimizer.param_groups, base, strict=True)}
    assert len(factors) == 1 and 0 < factors.pop() < 1  # past the peak, decaying, both


def test_a_saved_state_continues_exactly():
    model = _tiny_cnn()
    optimizer = make_optimizer(model.parameters(), MUON)
    _train_steps(model, optimizer, 3)
    saved_model = copy.deepcopy(model.state_dict())
    saved = copy.deepcopy(optimizer.state_dict())
    _train_steps(model, optimizer, 2, seed=2)

    resumed = _tiny_cnn()
    resumed.load_state_dict(saved_model)
    fresh = make_optimizer(resumed.parameters(), MUON)
    load_optimizer_state(fresh, saved)
    assert all("momentum_buffer" in fresh.state[p] for p in resumed.parameters())
    _train_steps(resumed, fresh, 2, seed=2)
    for key, value in model.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


MUON_RUN = [
    *["--preset", "quick", "--set", "optim.optimizer=muon", "--set", "optim.muon_lr=0.1"],
    *["--set", "optim.schedule=constant", "--set", "optim.warmup_epochs=0"],
    *["--set", "train.ema_decay=0.9", "--set", "model.widths=8,16,32,32"],
    *["--set", "train.batch_size=50", "--set", "train.eval_batch_size=100"],
]


def test_a_muon_run_trains_and_resumes_exactly(fake_data_dir, tmp_path):
    """Two epochs straight equal one epoch, then ``--resume --epochs 2``: equal only if the
    Muon momentum, the SGD momentum and the EMA all come back from the checkpoint."""
    straight, stepped = tmp_path / "straight", tmp_path / "stepped"
    common = ["train", *MUON_RUN, "--data-dir", str(fake_data_dir)]
    assert main([*common, "--epochs", "2", "--run-dir", str(straight)]) == 0
    assert main([*common, "--epochs", "1", "--run-dir", str(stepped)]) == 0
    assert main(["train", "--resume", str(stepped), "--epochs", "2"]) == 0
    a = load_checkpoint(straight / "checkpoints" / "last.pt")
    b = load_checkpoint(stepped / "checkpoints" / "last.pt")
    assert a["epoch"] == b["epoch"] == 2
    assert [g["muon"] for g in a["optimizer"]["param_groups"]] == [True, False, False]
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
        assert torch.equal(a["ema"][key], b["ema"][key]), key
    torch.manual_seed(0)  # train.seed: the run's initial weights
    start = FastCNN(100, (8, 16, 32, 32)).state_dict()["features.0.weight"]
    trained = a["model"]["features.0.weight"]
    assert trained.isfinite().all() and not torch.allclose(trained, start)
