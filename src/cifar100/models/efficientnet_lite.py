"""EfficientNet-Lite0 and Lite2 (Tan & Le 2019; Google's edge variants of EfficientNet).

One architecture, one table of stages per variant (``VARIANTS``). Lite drops
squeeze-excitation, uses ReLU6 instead of swish and keeps the stem (32) and head (1280)
widths fixed, so it quantises well and runs fast on plain CPUs. The layout
matches MobileNetV2's (``features``: stem, the MBConv blocks, 1x1 head conv; then
``classifier``) so that the transfer code treats both backbones alike.

The ImageNet weights were trained in TensorFlow with "SAME" padding: a stride-2 conv on an
even input pads one pixel less at the top/left than at the bottom/right. PyTorch's
symmetric padding would shift every downsampled feature map by half a pixel, so stride-2
convs pad explicitly, computed from the input size. ``from_lukemelas`` renames the keys of
the widely used lukemelas EfficientNet-PyTorch layout onto this module's names; it is a
pure function, applied by ``cifar100.models.weights`` (this module never touches files).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cifar100.config.schema import ConfigError, ModelConfig
from cifar100.models.backbone import Backbone, build_head, init_weights

Stages = tuple[tuple[int, int, int, int, int], ...]


@dataclass(frozen=True)
class Variant:
    """One EfficientNet-Lite: its stages, as read off its ImageNet weights file."""

    name: str  # in the model registry
    # Per stage: n repeats, k depthwise kernel, s stride of the first repeat, e expansion,
    # c out channels.
    stages: Stages
    dropout: float  # before the ImageNet classifier
    native_size: int  # the ImageNet input size the weights were trained at

    @property
    def head_index(self) -> int:
        """Index of the 1x1 head conv in ``features``: after the stem and every block."""
        return 1 + sum(n for n, *_ in self.stages)


LITE0 = Variant(
    "efficientnet-lite0",
    ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
     (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320)),
    dropout=0.2,
    native_size=224,
)  # fmt: skip
# Lite2: Lite0's depth x1.2 and width x1.1 (rounded to multiples of 8), stem and head fixed.
LITE2 = Variant(
    "efficientnet-lite2",
    ((1, 3, 1, 1, 16), (3, 3, 2, 6, 24), (3, 5, 2, 6, 48), (4, 3, 2, 6, 88),
     (4, 5, 1, 6, 120), (5, 5, 2, 6, 208), (1, 3, 1, 6, 352)),
    dropout=0.3,
    native_size=260,
)  # fmt: skip
VARIANTS = {variant.name: variant for variant in (LITE0, LITE2)}
STEM_CHANNELS, HEAD_CHANNELS = 32, 1280  # fixed in Lite (B0 scales them with the width)
BN_EPS = 1e-3  # TensorFlow's, which the running variances were estimated with
BN_MOMENTUM = 0.01  # TensorFlow's decay 0.99, as the weights were trained


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF "SAME" (before, after) padding: output ceil(size / stride), odd pixel after."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class SameConv2d(nn.Conv2d):
    """Bias-free conv with TensorFlow "SAME" padding, from the input's height and width."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1):
        # Stride 1 with an odd kernel is symmetric, which Conv2d pads without a copy.
        padding = (kernel - 1) // 2 if stride == 1 else 0
        super().__init__(in_ch, out_ch, kernel, stride, padding, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == (1, 1):
            return super().forward(x)
        # Python ints here: traced to constants, so an export sees one static input size.
        top, bottom = same_padding(int(x.shape[-2]), self.kernel_size[0], self.stride[0])
        left, right = same_padding(int(x.shape[-1]), self.kernel_size[1], self.stride[1])
        return super().forward(F.pad(x, (left, right, top, bottom)))


class ConvBN(nn.Sequential):
    """SameConv2d -> BatchNorm (TF eps and momentum) -> ReLU6 unless ``act`` is False."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel: int = 1,
        stride: int = 1,
        groups: int = 1,
        act: bool = True,
    ):
        layers: list[nn.Module] = [
            SameConv2d(in_ch, out_ch, kernel, stride, groups),
            nn.BatchNorm2d(out_ch, eps=BN_EPS, momentum=BN_MOMENTUM),
        ]
        if act:
            layers.append(nn.ReLU6(inplace=True))
        super().__init__(*layers)


class MBConv(nn.Module):
    """Expand (1x1) -> depthwise (k x k) -> linear project (1x1); residual when shapes allow."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = in_ch * expand_ratio
        self.use_residual = stride == 1 and in_ch == out_ch
        # The first block has e=1: no expansion layer, as in the weights files.
        self.expand = ConvBN(in_ch, hidden) if expand_ratio != 1 else nn.Identity()
        self.depthwise = ConvBN(hidden, hidden, kernel, stride, groups=hidden)
        self.project = ConvBN(hidden, out_ch, act=False)  # linear bottleneck

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.depthwise(self.expand(x)))  # (B, out_ch, H/stride, W/stride)
        return x + out if self.use_residual else out


class EfficientNetLite(Backbone):
    def __init__(
        self,
        num_classes: int = 1000,
        dropout: float | None = None,
        head_hidden: int | None = None,
        variant: Variant = LITE0,
    ):
        super().__init__()
        features: list[nn.Module] = [ConvBN(3, STEM_CHANNELS, 3, stride=2)]
        in_ch = STEM_CHANNELS
        for n, k, s, e, c in variant.stages:
            for i in range(n):
                features.append(MBConv(in_ch, c, k, s if i == 0 else 1, e))
                in_ch = c
        features.append(ConvBN(in_ch, HEAD_CHANNELS))
        self.features = nn.Sequential(*features)  # stem, the MBConv blocks, 1x1 head conv
        self.last_channel = HEAD_CHANNELS
        dropout = variant.dropout if dropout is None else dropout
        self.classifier = build_head(HEAD_CHANNELS, num_classes, dropout, head_hidden)
        init_weights(self)


def build_efficientnet_lite(config: ModelConfig, num_classes: int) -> nn.Module:
    """Registry builder for every variant, named by ``config.name``: ``config.dropout``
    (None: the variant's ImageNet dropout) and ``config.head_hidden``."""
    if config.width_mult != 1.0:  # the ImageNet weights exist for the one width only
        raise ConfigError(
            f"{config.name} has no width multiplier "
            f"(model.width_mult={config.width_mult}); leave it at 1.0"
        )
    variant = VARIANTS[config.name]
    return EfficientNetLite(num_classes, config.dropout, config.head_hidden, variant)


# lukemelas names -> this module's, per part: stem and head (features.0 and the last
# features block, whose index depends on the variant's depth), blocks.
_OUTER = {
    "_conv_stem": "features.0.0",
    "_bn0": "features.0.1",
    "_conv_head": "features.{head}.0",
    "_bn1": "features.{head}.1",
    "_fc": "classifier.1",
}
_BLOCK = {
    "_expand_conv": "expand.0",
    "_bn0": "expand.1",
    "_depthwise_conv": "depthwise.0",
    "_bn1": "depthwise.1",
    "_project_conv": "project.0",
    "_bn2": "project.1",
}
_BLOCK_KEY = re.compile(r"^_blocks\.(\d+)\.(\w+)\.(\w+)$")
_OUTER_KEY = re.compile(r"^(_\w+)\.(\w+)$")


def from_lukemelas(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a lukemelas-layout state dict (``_conv_stem``, ``_blocks.N._bn1``, ``_fc``...).

    Block N of the file is ``features.N+1`` here, and the head conv follows the last block
    (``features.17`` for Lite0, ``features.22`` for Lite2). Raises KeyError naming the first
    key that has no counterpart (another EfficientNet, e.g. with squeeze-excitation).
    """
    blocks = {int(m.group(1)) for key in state if (m := _BLOCK_KEY.match(key))}
    head = 1 + len(blocks)
    mapped = {}
    for key, value in state.items():
        block = _BLOCK_KEY.match(key)
        outer = _OUTER_KEY.match(key)
        if block and block.group(2) in _BLOCK:
            index, part, param = block.groups()
            mapped[f"features.{int(index) + 1}.{_BLOCK[part]}.{param}"] = value
        elif outer and outer.group(1) in _OUTER:
            mapped[f"{_OUTER[outer.group(1)].format(head=head)}.{outer.group(2)}"] = value
        else:
            raise KeyError(key)
    return mapped
