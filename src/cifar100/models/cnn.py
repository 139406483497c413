"""The custom CNNs, built from a table of stages. Pure modules: no I/O."""

from __future__ import annotations

import torch
from torch import nn

from cifar100.config.schema import ModelConfig


def conv_bn_relu(c_in: int, c_out: int) -> list[nn.Module]:
    return [
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    ]


class SeedCNN(nn.Module):
    """The coursework network: per stage, N x (Conv3x3-BN-ReLU), MaxPool, Dropout."""

    # width, convs per stage, dropout after the stage
    STAGES = ((32, 2, 0.2), (64, 2, 0.3), (128, 2, 0.4))

    def __init__(self, num_classes: int = 100, widths=None, head_dropout: float = 0.5):
        super().__init__()
        stages = (
            self.STAGES
            if widths is None
            else [(w, n, d) for w, (_, n, d) in zip(widths, self.STAGES, strict=True)]
        )
        layers, c_in = [], 3
        for width, n_convs, dropout in stages:
            for _ in range(n_convs):
                layers += conv_bn_relu(c_in, width)
                c_in = width
            layers += [nn.MaxPool2d(2), nn.Dropout(dropout)]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(head_dropout), nn.Linear(c_in, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)  # (B, 128, 4, 4)
        x = x.mean(dim=(2, 3))  # global average pooling -> (B, 128)
        return self.classifier(x)  # (B, classes)


class Residual(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.body = nn.Sequential(*conv_bn_relu(width, width), *conv_bn_relu(width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class FastCNN(nn.Module):
    """ResNet-9-style: conv + pool per stage, residual pairs where they pay for themselves.

    Pooling right after each stage's first conv keeps most FLOPs at low resolution, where
    a 2-core CPU runs convolutions most efficiently (wide channels, small maps).
    """

    # width, residual blocks after the stage's conv+pool
    STAGES = ((48, 0), (96, 1), (192, 0), (256, 1))

    def __init__(self, num_classes: int = 100, widths=None, dropout: float = 0.0):
        super().__init__()
        stages = (
            self.STAGES
            if widths is None
            else [(w, r) for w, (_, r) in zip(widths, self.STAGES, strict=False)]
        )
        stem_width = stages[0][0] // 2
        layers = conv_bn_relu(3, stem_width)  # (B, 32, 32, 32)
        c_in = stem_width
        for i, (width, n_res) in enumerate(stages):
            layers += [nn.Conv2d(c_in, width, 3, padding=1, bias=False)]
            if i < len(stages) - 1:
                layers += [nn.MaxPool2d(2)]  # 32 -> 16 -> 8 -> 4
            layers += [nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
            layers += [Residual(width) for _ in range(n_res)]
            c_in = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(c_in, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)  # (B, C, 4, 4)
        x = x.mean(dim=(2, 3))  # global average pooling -> (B, C)
        return self.classifier(x)


def build_seed_cnn(config: ModelConfig, num_classes: int) -> nn.Module:
    dropout = 0.5 if config.dropout is None else config.dropout
    return SeedCNN(num_classes, config.widths, dropout)


def build_fast_cnn(config: ModelConfig, num_classes: int) -> nn.Module:
    return FastCNN(num_classes, config.widths, config.dropout or 0.0)
