"""ResNet-18 for 32 px images, the GPU recipe's network: stages as a table. Pure modules.

He et al.'s CIFAR variant of the ImageNet network: a 3x3 stem and no max-pool, so the
first stage still sees 32x32 maps (a 7x7 stride-2 stem and a pool would leave 8x8).
11.2 M parameters and 1.1 GFLOPs per image forward (``count_flops``): 5.5 and 8 times
cnn-fast's, a size for a GPU's budget rather than a 2-core CPU's.
"""

from __future__ import annotations

import torch
from torch import nn

from cifar100.config.schema import ModelConfig


def conv_bn(c_in: int, c_out: int, kernel: int = 3, stride: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(c_in, c_out, kernel, stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(c_out),
    ]


class BasicBlock(nn.Module):
    """Two 3x3 convs and a shortcut (a strided 1x1 conv where the shape changes)."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            *conv_bn(c_in, c_out, 3, stride), nn.ReLU(inplace=True), *conv_bn(c_out, c_out)
        )
        # The block starts as the identity (last BN scale 0): deep nets then train from
        # the first step at a large learning rate (Goyal et al., 2017).
        nn.init.zeros_(self.body[-1].weight)
        same = stride == 1 and c_in == c_out
        self.shortcut = nn.Identity() if same else nn.Sequential(*conv_bn(c_in, c_out, 1, stride))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class ResNet(nn.Module):
    # width, blocks, stride of the stage's first block
    STAGES = ((64, 2, 1), (128, 2, 2), (256, 2, 2), (512, 2, 2))

    def __init__(self, num_classes: int = 100, widths=None, dropout: float = 0.0):
        super().__init__()
        stages = (
            self.STAGES
            if widths is None
            else [(w, n, s) for w, (_, n, s) in zip(widths, self.STAGES, strict=True)]
        )
        c_in = stages[0][0]
        layers = [*conv_bn(3, c_in), nn.ReLU(inplace=True)]  # (B, 64, 32, 32)
        for width, blocks, stride in stages:  # 32 -> 32 -> 16 -> 8 -> 4
            for i in range(blocks):
                layers.append(BasicBlock(c_in, width, stride if i == 0 else 1))
                c_in = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(c_in, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)  # (B, 512, 4, 4)
        x = x.mean(dim=(2, 3))  # global average pooling -> (B, 512)
        return self.classifier(x)  # (B, classes)


def build_resnet18(config: ModelConfig, num_classes: int) -> nn.Module:
    return ResNet(num_classes, config.widths, config.dropout or 0.0)
