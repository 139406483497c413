"""Every pretrained backbone in the registry: freezing (BatchNorm included) and shapes.

In PyTorch ``requires_grad=False`` does not stop BatchNorm running statistics from moving,
and ``model.train()`` undoes a one-off ``bn.eval()``: these tests train with every
parameter in the optimizer, weight decay on, and check bit-identical frozen blocks.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cifar100.config.schema import ModelConfig
from cifar100.models import REGISTRY, build_model
from cifar100.models.backbone import (
    Backbone,
    extract_features,
    freeze_backbone,
    trainable_parameters,
    unfreeze,
)

PRETRAINED = sorted(name for name, spec in REGISTRY.items() if spec.pretrained)


def test_the_imagenet_backbones_are_registered() -> None:
    assert PRETRAINED == ["efficientnet-lite0", "efficientnet-lite2", "mobilenetv2"]


def _model(name: str, num_classes: int = 10) -> Backbone:
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name), num_classes=num_classes)
    assert isinstance(model, Backbone)
    return model


def _train_step(model: nn.Module, size: int = 64) -> None:
    torch.manual_seed(0)
    # All parameters, with weight decay: frozen ones have no grad, so SGD must skip them.
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=0.1)
    model.train()
    images, labels = torch.randn(8, 3, size, size), torch.randint(0, 10, (8,))
    nn.functional.cross_entropy(model(images), labels).backward()
    optimizer.step()


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("name", PRETRAINED)
def test_frozen_backbone_stays_frozen_through_train(name: str) -> None:
    model = _model(name)
    freeze_backbone(model)
    features, head = _snapshot(model.features), _snapshot(model.classifier)
    _train_step(model)
    for key, value in model.features.state_dict().items():  # weights AND running stats
        assert torch.equal(value, features[key]), key
    assert not torch.equal(model.classifier[1].weight, head["1.weight"])
    assert all(not m.training for m in model.features.modules())
    assert model.classifier.training
    assert trainable_parameters(model) == list(model.classifier.parameters())


@pytest.mark.parametrize("name", PRETRAINED)
def test_unfreeze_top_blocks(name: str) -> None:
    model = _model(name)
    freeze_backbone(model)
    unfreeze(model, 2)
    before = [_snapshot(block) for block in model.features]
    _train_step(model)
    for block, old in zip(model.features[:-2], before[:-2], strict=True):
        assert all(torch.equal(v, old[k]) for k, v in block.state_dict().items())
        assert not block.training and not any(p.requires_grad for p in block.parameters())
    for block, old in zip(model.features[-2:], before[-2:], strict=True):
        assert block.training and all(p.requires_grad for p in block.parameters())
        now = block.state_dict()
        stats = [k for k in old if k.endswith("running_mean")]
        assert stats and all(not torch.equal(now[k], old[k]) for k in stats)
    unfreeze(model, None)
    assert model.frozen_blocks == 0 and all(m.training for m in model.features.modules())
    with pytest.raises(ValueError):
        unfreeze(model, len(model.features) + 1)


@pytest.mark.parametrize("name", PRETRAINED)
@pytest.mark.parametrize("size", [96, 128])
def test_forward_and_feature_shapes(name: str, size: int) -> None:
    model = _model(name, num_classes=100)
    images = torch.randn(2, 3, size, size)
    stats = _snapshot(model.features)
    assert extract_features(model, images).shape == (2, 1280)
    assert model.training  # mode restored, and no BN statistics moved while extracting
    assert all(torch.equal(v, stats[k]) for k, v in model.features.state_dict().items())
    assert model(images).shape == (2, 100)
