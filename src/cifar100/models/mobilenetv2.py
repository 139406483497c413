"""MobileNetV2 (Sandler et al. 2018) in torchvision's state-dict layout.

Keeping torchvision's module names (``features.N.conv.M...``, ``classifier.1``) means any
torchvision-layout ImageNet checkpoint loads strictly, with no key surgery; the classic
layout is renamed by a pure function here (``from_classic_layout``) that
``cifar100.models.weights``, which does all file I/O, applies. This module never touches files.
Freezing (BatchNorm included) and the head are shared with EfficientNet-Lite0 in
``cifar100.models.backbone``; their names are re-exported here for older imports.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from cifar100.config.schema import ModelConfig
from cifar100.models.backbone import (
    Backbone,
    build_head,
    extract_features,
    freeze_backbone,
    init_weights,
    set_frozen_blocks,
    trainable_parameters,
    unfreeze,
)

__all__ = [
    "MobileNetV2",
    "build_head",
    "build_mobilenetv2",
    "extract_features",
    "freeze_backbone",
    "from_classic_layout",
    "set_frozen_blocks",
    "trainable_parameters",
    "unfreeze",
]

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


class MobileNetV2(Backbone):
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
        init_weights(self)


def build_mobilenetv2(config: ModelConfig, num_classes: int) -> nn.Module:
    """Registry builder: ``config.width_mult`` and ``config.dropout`` (None: 0.2)."""
    dropout = DEFAULT_DROPOUT if config.dropout is None else config.dropout
    return MobileNetV2(
        num_classes, width_mult=config.width_mult, dropout=dropout, head_hidden=config.head_hidden
    )


# The classic pytorch-mobilenet-v2 port numbers a block's layers flat (ReLU6 included);
# torchvision nests Conv-BN-ReLU triples. Old index -> new suffix, per block kind.
_EXPANDED_BLOCK = {"0": "0.0", "1": "0.1", "3": "1.0", "4": "1.1", "6": "2", "7": "3"}
_DEPTHWISE_BLOCK = {"0": "0.0", "1": "0.1", "3": "1", "4": "2"}  # t=1: no expansion layer
_BLOCK_KEY = re.compile(r"^features\.(\d+)\.conv\.(\d+)\.([a-z_]+)$")


def from_classic_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename classic pytorch-mobilenet-v2 block keys to torchvision's nested ones.

    Raises KeyError naming the first block key that has no torchvision counterpart.
    """
    mapped = {}
    for key, value in state.items():
        match = _BLOCK_KEY.match(key)
        if not match:  # stem (features.0), last conv (features.18), classifier already agree
            mapped[key] = value
            continue
        block, index, param = match.groups()
        # Only expanded blocks (t=6) have the 8-layer layout with a projection at conv.6.
        table = _EXPANDED_BLOCK if f"features.{block}.conv.6.weight" in state else _DEPTHWISE_BLOCK
        if index not in table:
            raise KeyError(key)
        mapped[f"features.{block}.conv.{table[index]}.{param}"] = value
    return mapped
