"""What the ImageNet backbones share: ``features`` + ``classifier``, block freezing, the head.

MobileNetV2 and EfficientNet-Lite0 both expose ``features`` (an ``nn.Sequential`` of blocks
ending in a 1280-channel conv) and ``classifier`` (dropout + linear, or a small MLP), so the
transfer code treats them alike through the helpers here.

The transfer recipe freezes the backbone, trains a new head, then unfreezes the top blocks.
In PyTorch ``requires_grad=False`` does not stop BatchNorm running statistics from moving,
and a one-off ``bn.eval()`` is undone by the next ``model.train()``; so the model remembers
how many leading feature blocks are frozen and re-applies eval mode to them in ``train()``.
"""

from __future__ import annotations

import torch
from torch import nn


class Backbone(nn.Module):
    """Base class: subclasses set ``features`` (nn.Sequential) and ``classifier``."""

    features: nn.Sequential
    classifier: nn.Module

    def __init__(self) -> None:
        super().__init__()
        self.frozen_blocks = 0  # leading feature blocks kept frozen (weights and BN stats)

    def train(self, mode: bool = True) -> Backbone:
        super().train(mode)
        # Re-applied on every call: otherwise model.train() would let frozen BN stats drift.
        for block in self.features[: self.frozen_blocks]:
            block.eval()
        if mode and self.frozen_blocks == len(self.features):
            self.features.eval()  # so a fully frozen backbone also reports eval as a whole
        return self

    def forward_features(self, images: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Pooled features of ``images``; with ``start``, of the output of the first
        ``start`` feature blocks instead (stage 1 training the top blocks on cached maps)."""
        x = self.features[start:](images) if start else self.features(images)  # (B, 1280, h, w)
        return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)  # (B, 1280)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.forward_features(images))  # (B, num_classes)


def build_head(
    in_features: int, num_classes: int, dropout: float, hidden: int | None = None
) -> nn.Sequential:
    """Classifier head; ``classifier.1`` stays the first Linear as in torchvision."""
    if hidden is None:
        return nn.Sequential(nn.Dropout(dropout), nn.Linear(in_features, num_classes))
    return nn.Sequential(
        nn.Dropout(dropout),
        nn.Linear(in_features, hidden),
        nn.ReLU(inplace=True),
        nn.Dropout(dropout),
        nn.Linear(hidden, num_classes),
    )


def init_weights(model: nn.Module) -> None:
    """torchvision's scheme, so a fresh model matches a fresh torchvision one statistically."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


def set_frozen_blocks(model: Backbone, frozen_blocks: int) -> None:
    """Freeze the first ``frozen_blocks`` feature blocks and make the rest trainable.

    Frozen blocks get ``requires_grad=False`` and stay in eval mode (BN running statistics
    fixed) through every later ``model.train()``; the classifier is always trainable.
    """
    if not 0 <= frozen_blocks <= len(model.features):
        raise ValueError(f"frozen_blocks must be in 0..{len(model.features)}, got {frozen_blocks}")
    model.frozen_blocks = frozen_blocks
    for i, block in enumerate(model.features):
        block.requires_grad_(i >= frozen_blocks)
    model.classifier.requires_grad_(True)
    model.train(model.training)  # re-apply modes now, keeping the current train/eval state


def freeze_backbone(model: Backbone) -> None:
    """Stage 1 of transfer learning: only the classifier head learns."""
    set_frozen_blocks(model, len(model.features))


def unfreeze(model: Backbone, top_blocks: int | None = None) -> None:
    """Stage 2: make the top ``top_blocks`` feature blocks trainable (None: all of them).

    Blocks below stay frozen, including their BatchNorm statistics.
    """
    n_blocks = len(model.features)
    if top_blocks is None:
        top_blocks = n_blocks
    if not 0 <= top_blocks <= n_blocks:
        raise ValueError(f"top_blocks must be in 0..{n_blocks}, got {top_blocks}")
    set_frozen_blocks(model, n_blocks - top_blocks)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Only what should learn, so optimizers (and weight decay) never touch frozen weights."""
    return [p for p in model.parameters() if p.requires_grad]


@torch.no_grad()
def extract_features(model: Backbone, images: torch.Tensor) -> torch.Tensor:
    """Pooled backbone features ``(B, 1280)``, deterministic (eval mode, no grad).

    Used to cache stage-1 inputs once instead of re-running the frozen backbone every epoch;
    the model's train/eval mode is restored afterwards.
    """
    was_training = model.training
    model.eval()
    try:
        return model.forward_features(images)  # (B, 1280)
    finally:
        model.train(was_training)
