"""Batched augmentation: per-image random parameters, seeded, and each op doing its job."""

from __future__ import annotations

import math

import pytest
import torch

from cifar100.config.schema import AugmentConfig
from cifar100.data.augment import (
    apply_augment,
    augment_batch,
    draw_augment,
    mix_batch,
    one_hot,
    random_affine,
    random_contrast,
    random_flip,
    random_translate,
    to_float,
)

SEED_RECIPE = AugmentConfig(flip=True, translate=0, rotation=15, zoom=0.1, contrast=0.1)
RECIPES = {
    "flip+translate": AugmentConfig(),
    "seed recipe": SEED_RECIPE,
    "everything": AugmentConfig(translate=4, rotation=15, zoom=0.1, contrast=0.2),
    "nothing": AugmentConfig(flip=False, translate=0),
}


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """(64, 3, 32, 32) float noise in [0, 1], every image different."""
    return to_float(torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=gen(9)))


def square(n: int, side: int = 12) -> torch.Tensor:
    """(n, 3, 32, 32): a bright centred square on black."""
    out = torch.zeros(n, 3, 32, 32)
    lo = 16 - side // 2
    out[:, :, lo : lo + side, lo : lo + side] = 1.0
    return out


def test_to_float_range():
    raw = torch.tensor([0, 128, 255], dtype=torch.uint8).view(1, 3, 1, 1)
    assert torch.allclose(to_float(raw).flatten(), torch.tensor([0.0, 128 / 255, 1.0]))


@pytest.mark.parametrize("name", list(RECIPES))
def test_shape_dtype_range_and_seed(images, name):
    out = augment_batch(images, RECIPES[name], gen(1))
    assert out.shape == images.shape and out.dtype == torch.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert torch.equal(out, augment_batch(images, RECIPES[name], gen(1)))
    if name == "nothing":
        assert torch.equal(out, images)
    else:
        assert not torch.equal(out, augment_batch(images, RECIPES[name], gen(2)))
        assert not torch.equal(out, images)


def test_flip_is_per_image_and_about_half():
    images = torch.rand(2000, 3, 8, 8, generator=gen(3))
    out = random_flip(images, gen(4))
    flipped = (out == images.flip(3)).flatten(1).all(1)
    kept = (out == images).flatten(1).all(1)
    assert bool((flipped | kept).all())  # each image is either mirrored or untouched
    assert 0.45 < flipped.float().mean() < 0.55


def test_translate_moves_content_by_up_to_pad():
    images = torch.zeros(500, 3, 32, 32)
    images[:, :, 16, 16] = 1.0  # one bright pixel; reflection keeps copies > 4 px away
    out = random_translate(images, 4, gen(5))
    assert out.shape == images.shape
    where = out[:, 0].flatten(1).argmax(1)
    dy, dx = where // 32 - 16, where % 32 - 16
    assert int(dy.abs().max()) == 4 and int(dx.abs().max()) == 4
    assert set(dy.tolist()) == set(range(-4, 5)) and set(dx.tolist()) == set(range(-4, 5))
    assert torch.allclose(out.sum(dim=(1, 2, 3)), torch.full((500,), 3.0))  # moved, not lost


def test_translate_is_a_crop_of_the_reflect_padded_image(images):
    out = random_translate(images[:8], 2, gen(6))
    padded = torch.nn.functional.pad(images[:8], (2, 2, 2, 2), mode="reflect")
    for img, pad in zip(out, padded, strict=True):
        crops = [pad[:, y : y + 32, x : x + 32] for y in range(5) for x in range(5)]
        assert any(torch.equal(img, crop) for crop in crops)


def test_contrast_scales_each_image_around_its_means():
    images = torch.rand(400, 3, 16, 16, generator=gen(7)) * 0.5 + 0.25  # no clamping
    out = random_contrast(images, 0.2, gen(8))
    assert torch.allclose(out.mean(dim=(2, 3)), images.mean(dim=(2, 3)), atol=1e-5)
    factor = out.std(dim=(1, 2, 3)) / images.std(dim=(1, 2, 3))
    assert 0.8 - 1e-4 < float(factor.min()) < 0.83 and 1.17 < float(factor.max()) < 1.2 + 1e-4
    assert len(set(factor.round(decimals=5).tolist())) > 390  # independent per image


def test_zoom_scales_content_within_bounds():
    images = square(400)
    out = random_affine(images, rotation=0.0, zoom=0.1, generator=gen(10))
    # Bilinear resampling keeps the total brightness proportional to the square's area:
    # zoom factors in [0.9, 1.1] scale it by [0.81, 1.21].
    area = out[:, 0].sum(dim=(1, 2)) / images[:, 0].sum(dim=(1, 2))
    assert float(area.min()) > 0.8 and float(area.max()) < 1.22
    assert float(area.min()) < 0.85 and float(area.max()) > 1.15  # both in and out


def principal_angle(images: torch.Tensor) -> torch.Tensor:
    """Orientation in degrees of the bright blob in each image, from its second moments."""
    weight = images[:, 0]
    ys, xs = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    total = weight.sum(dim=(1, 2))
    my, mx = (weight * ys).sum(dim=(1, 2)) / total, (weight * xs).sum(dim=(1, 2)) / total
    dy, dx = ys - my[:, None, None], xs - mx[:, None, None]
    cyy = (weight * dy * dy).sum(dim=(1, 2))
    cxx = (weight * dx * dx).sum(dim=(1, 2))
    cxy = (weight * dx * dy).sum(dim=(1, 2))
    return torch.rad2deg(0.5 * torch.atan2(2 * cxy, cxx - cyy))


def test_rotation_turns_content_within_bounds():
    bars = torch.zeros(400, 3, 32, 32)
    bars[:, :, 14:18, 4:28] = 1.0  # a horizontal bar: angle 0
    out = random_affine(bars, rotation=15.0, zoom=0.0, generator=gen(11))
    angles = principal_angle(out)
    assert float(angles.abs().max()) < 16.0
    assert float(angles.min()) < -10.0 and float(angles.max()) > 10.0
    assert torch.allclose(principal_angle(bars), torch.zeros(400), atol=1e-3)


def test_affine_without_rotation_or_zoom_is_identity(images):
    out = random_affine(images, rotation=0.0, zoom=0.0, generator=gen(12))
    assert torch.allclose(out, images, atol=1e-5)


@pytest.mark.parametrize(
    "config",
    [
        AugmentConfig(mixup_alpha=0.4),
        AugmentConfig(cutmix_alpha=1.0),
        AugmentConfig(mixup_alpha=0.2, cutmix_alpha=1.0),
    ],
    ids=["mixup", "cutmix", "both"],
)
def test_mixed_targets_sum_to_one_and_follow_the_generator(images, config):
    targets = one_hot(torch.arange(64) % 100, 100, smoothing=0.1)
    torch.manual_seed(0)
    mixed, soft = mix_batch(images, targets, config, gen(13))
    torch.manual_seed(1)  # the global RNG must not matter: resumed runs replay the generator
    again, soft_again = mix_batch(images, targets, config, gen(13))
    assert torch.equal(mixed, again) and torch.equal(soft, soft_again)
    assert torch.allclose(soft.sum(1), torch.ones(64), atol=1e-5)
    assert mixed.shape == images.shape and mixed.min() >= 0 and mixed.max() <= 1
    assert not torch.equal(mixed, images)


def test_mixup_blends_images_and_targets_with_the_same_weight(images):
    targets = one_hot(torch.arange(64), 100)
    mixed, soft = mix_batch(images, targets, AugmentConfig(mixup_alpha=0.4), gen(14))
    lam = soft[torch.arange(64), torch.arange(64)]  # own-label weight, (64,)
    partner = torch.where(soft > 0, 1.0, 0.0)
    partner[torch.arange(64), torch.arange(64)] = 0
    other = partner.argmax(1)  # the mixed-in image (its label is its index)
    blend = images * lam[:, None, None, None] + images[other] * (1 - lam[:, None, None, None])
    assert torch.allclose(mixed, blend, atol=1e-5)


def test_cutmix_pastes_a_box_whose_area_is_the_target_weight(images):
    targets = one_hot(torch.arange(64), 100)
    mixed, soft = mix_batch(images, targets, AugmentConfig(cutmix_alpha=1.0), gen(15))
    own = (mixed == images).all(1)  # (64, 32, 32) pixels kept from the image itself
    lam = soft[torch.arange(64), torch.arange(64)]
    assert torch.allclose(own.flatten(1).float().mean(1), lam, atol=1e-6)


def test_no_mixing_returns_inputs_unchanged(images):
    targets = one_hot(torch.arange(64), 100)
    mixed, soft = mix_batch(images, targets, AugmentConfig(), gen(16))
    assert mixed is images and soft is targets


def test_one_hot_with_smoothing():
    targets = one_hot(torch.tensor([3, 0]), 10, smoothing=0.1)
    assert targets.shape == (2, 10)
    assert math.isclose(float(targets[0, 3]), 0.91, rel_tol=1e-6)
    assert math.isclose(float(targets[0, 0]), 0.01, rel_tol=1e-6)
    assert torch.allclose(targets.sum(1), torch.ones(2))
    assert torch.equal(one_hot(torch.tensor([2]), 4), torch.tensor([[0.0, 0.0, 1.0, 0.0]]))


@pytest.mark.parametrize("name", list(RECIPES))
def test_stored_draws_repeat_an_augmentation_image_by_image(images, name):
    """What the distillation cache relies on: draws kept for the whole set, then indexed,
    give each image exactly the augmentation ``augment_batch`` gave it."""
    config = RECIPES[name]
    params = draw_augment(len(images), config, gen(3))
    expected = augment_batch(images, config, gen(3))
    rows = torch.tensor([5, 0, 63, 17])
    picked = apply_augment(images[rows], config, params.map(lambda draws: draws[rows]))
    assert torch.equal(picked, expected[rows])
