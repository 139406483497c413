"""MobileNetV2 (Sandler et al. 2018) in torchvision's state-dict layout, plus freezing helpers.

Keeping torchvision's module names (``features.N.conv.M...``, ``classifier.1``) means any
torchvision-layout ImageNet checkpoint loads strictly, with no key surgery here; other
layouts are mapped by ``cifar100.weights``, which does all file I/O. This module never
touches files.

The transfer recipe freezes the backbone, trains a new head, then unfreezes the top blocks.
In PyTorch ``requires_grad=False`` does not stop BatchNorm running statistics from moving,
and a one-off ``bn.eval()`` is undone by the next ``model.train()``; so the model remembers
how many leading feature blocks are frozen and re-applies eval mode to them in ``train()``.
"""

from __future__ import annotations

import torch
from torch import nn

from cifar100.config import ModelConfig

# t: expansion factor, c: output channels, n: repeats, s: stride of the first repeat
INVERTED_RESIDUAL_SETTING = [
    # t, c, n, s
    [1, 16, 1, 1],
    [6, 24, 2, 2],
    [6, 32, 3, 2],
    [6, 64, 4, 2],
    [6, 96, 3, 1],
    [6, 160, 3, 2],
    [6, 320, 1, 1],
]
LAST_CHANNEL = 1280
DEFAULT_DROPOUT = 0.2  # torchvision's ImageNet head


def _make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round channels to a multiple of ``divisor`` (hardware-friendly), never dropping >10%."""
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class ConvBNReLU(nn.Sequential):
    """Conv -> BatchNorm -> ReLU6; children 0, 1, 2 as torchvision's Conv2dNormActivation."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int = 3, stride: int = 1, groups: int = 1):
        padding = (kernel - 1) // 2
        super().__init__(
            nn.Conv2d(in_ch, out_ch, kernel, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    """Expand (1x1) -> depthwise (3x3) -> linear project (1x1), residual when shapes allow."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = int(round(in_ch * expand_ratio))
        self.use_res_connect = stride == 1 and in_ch == out_ch
        layers: list[nn.Module] = []
        if expand_ratio != 1:  # t=1 skips the expansion, so key indices shift by one
            layers.append(ConvBNReLU(in_ch, hidden, kernel=1))
        layers += [
            ConvBNReLU(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, out_ch, 1, bias=False),  # linear bottleneck: no activation
            nn.BatchNorm2d(out_ch),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


def build_head(
    in_features: int, num_classes: int, dropout: float = DEFAULT_DROPOUT, hidden: int | None = None
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


class MobileNetV2(nn.Module):
    def __init__(
        self,
        num_classes: int = 1000,
        width_mult: float = 1.0,
        dropout: float = DEFAULT_DROPOUT,
        head_hidden: int | None = None,
        round_nearest: int = 8,
    ):
        super().__init__()
        in_ch = _make_divisible(32 * width_mult, round_nearest)
        # Thinner nets keep 1280 features: the paper found shrinking the last layer hurts.
        self.last_channel = _make_divisible(LAST_CHANNEL * max(1.0, width_mult), round_nearest)
        features: list[nn.Module] = [ConvBNReLU(3, in_ch, stride=2)]
        for t, c, n, s in INVERTED_RESIDUAL_SETTING:
            out_ch = _make_divisible(c * width_mult, round_nearest)
            for i in range(n):
                features.append(InvertedResidual(in_ch, out_ch, s if i == 0 else 1, t))
                in_ch = out_ch
        features.append(ConvBNReLU(in_ch, self.last_channel, kernel=1))
        self.features = nn.Sequential(*features)  # 19 blocks: stem, 17 bottlenecks, 1x1 conv
        self.classifier = build_head(self.last_channel, num_classes, dropout, head_hidden)
        self.frozen_blocks = 0  # leading feature blocks kept frozen (weights and BN stats)
        self._init_weights()

    def _init_weights(self) -> None:
        # torchvision's scheme, so a fresh model matches a fresh torchvision one statistically
        for m in self.modules():
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

    def train(self, mode: bool = True) -> MobileNetV2:
        super().train(mode)
        # Re-applied on every call: otherwise model.train() would let frozen BN stats drift.
        for block in self.features[: self.frozen_blocks]:
            block.eval()
        if mode and self.frozen_blocks == len(self.features):
            self.features.eval()  # so a fully frozen backbone also reports eval as a whole
        return self

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        x = self.features(images)  # (B, last_channel=1280, H/32, W/32)
        return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)  # (B, 1280)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.forward_features(images))  # (B, num_classes)


def build_mobilenetv2(config: ModelConfig, num_classes: int) -> nn.Module:
    """Registry builder: ``config.width_mult`` and ``config.dropout`` (None: 0.2)."""
    dropout = DEFAULT_DROPOUT if config.dropout is None else config.dropout
    return MobileNetV2(num_classes, width_mult=config.width_mult, dropout=dropout,
                       head_hidden=config.head_hidden)


def set_frozen_blocks(model: MobileNetV2, frozen_blocks: int) -> None:
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


def freeze_backbone(model: MobileNetV2) -> None:
    """Stage 1 of transfer learning: only the classifier head learns."""
    set_frozen_blocks(model, len(model.features))


def unfreeze(model: MobileNetV2, top_blocks: int | None = None) -> None:
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
def extract_features(model: MobileNetV2, images: torch.Tensor) -> torch.Tensor:
    """Pooled backbone features ``(B, last_channel)``, deterministic (eval mode, no grad).

    Used to cache stage-1 inputs once instead of re-running the frozen backbone every epoch;
    the model's train/eval mode is restored afterwards.
    """
    was_training = model.training
    model.eval()
    try:
        return model.forward_features(images)  # (B, 1280)
    finally:
        model.train(was_training)
