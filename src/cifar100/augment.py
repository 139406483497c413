"""Batched augmentation: every image gets its own random parameters, in a few tensor ops.

No per-image Python runs in the training loop. Flips and integer shifts are cheap index
operations; rotation and zoom share one ``affine_grid``/``grid_sample`` call, and only run
when enabled. All randomness comes from an explicit ``torch.Generator`` so a seed (and a
saved generator state, on resume) fixes it.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from cifar100.config import AugmentConfig


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 in [0, 1]."""
    return images.float().div_(255.0)


def _uniform(n: int, low: float, high: float, generator, device) -> torch.Tensor:
    return torch.rand(n, generator=generator, device=device) * (high - low) + low


def random_flip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    flip = torch.rand(len(images), generator=generator, device=images.device) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(3), images)


def random_translate(images: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Reflect-pad by ``pad`` and crop back at a random offset per image (a random crop)."""
    B, C, H, W = images.shape
    padded = F.pad(images, (pad, pad, pad, pad), mode="reflect")  # (B, C, H+2p, W+2p)
    dy = torch.randint(0, 2 * pad + 1, (B,), generator=generator, device=images.device)
    dx = torch.randint(0, 2 * pad + 1, (B,), generator=generator, device=images.device)
    rows = dy[:, None] + torch.arange(H, device=images.device)  # (B, H)
    cols = dx[:, None] + torch.arange(W, device=images.device)  # (B, W)
    flat = rows[:, :, None] * (W + 2 * pad) + cols[:, None, :]  # (B, H, W)
    index = flat.view(B, 1, H * W).expand(B, C, H * W)
    return padded.flatten(2).gather(2, index).view(B, C, H, W)


def random_affine(
    images: torch.Tensor, rotation: float, zoom: float, generator: torch.Generator
) -> torch.Tensor:
    """Rotate by up to +-``rotation`` degrees and zoom by up to +-``zoom``, reflecting edges."""
    B = len(images)
    angle = _uniform(B, -rotation, rotation, generator, images.device) * (math.pi / 180)
    scale = 1.0 / _uniform(B, 1 - zoom, 1 + zoom, generator, images.device)  # >1 zooms out
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    zeros = torch.zeros_like(cos)
    theta = torch.stack([cos, -sin, zeros, sin, cos, zeros], dim=1).view(B, 2, 3)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(
        images, grid, mode="bilinear", padding_mode="reflection", align_corners=False
    )


def random_contrast(images: torch.Tensor, amount: float, generator: torch.Generator):
    """Keras-style RandomContrast: scale each image's deviation from its channel means."""
    factor = _uniform(len(images), 1 - amount, 1 + amount, generator, images.device)
    mean = images.mean(dim=(2, 3), keepdim=True)
    return ((images - mean) * factor[:, None, None, None] + mean).clamp_(0.0, 1.0)


def augment_batch(
    images: torch.Tensor, config: AugmentConfig, generator: torch.Generator
) -> torch.Tensor:
    """float [0, 1] (B, 3, H, W) -> augmented float [0, 1] (B, 3, H, W)."""
    if config.flip:
        images = random_flip(images, generator)
    if config.rotation > 0 or config.zoom > 0:
        images = random_affine(images, config.rotation, config.zoom, generator)
    if config.translate > 0:
        images = random_translate(images, config.translate, generator)
    if config.contrast > 0:
        images = random_contrast(images, config.contrast, generator)
    return images


def mix_batch(
    images: torch.Tensor, targets: torch.Tensor, config: AugmentConfig, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """MixUp or CutMix (one chosen per batch when both are on) on soft targets (B, classes)."""
    use_mixup, use_cutmix = config.mixup_alpha > 0, config.cutmix_alpha > 0
    if not (use_mixup or use_cutmix):
        return images, targets
    if images.device.type != "cpu":
        return mix_batch_on_device(images, targets, config, generator)
    if use_mixup and use_cutmix:
        use_mixup = bool(torch.rand(1, generator=generator, device=generator.device) < 0.5)
    alpha = config.mixup_alpha if use_mixup else config.cutmix_alpha
    lam = _beta(alpha, generator)
    order = torch.randperm(len(images), generator=generator, device=generator.device)
    if use_mixup:
        mixed = images * lam + images[order] * (1 - lam)
    else:
        mixed, lam = _cutmix(images, order, lam, generator)
    return mixed, targets * lam + targets[order] * (1 - lam)


def _beta(alpha: float, generator: torch.Generator) -> float:
    """Beta(alpha, alpha) drawn from ``generator``, so a seed (or a resumed state) fixes it.

    torch's Beta sampler only reads the global RNG, hence numpy seeded from the generator.
    """
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    return float(np.random.default_rng(seed).beta(alpha, alpha))


def _cutmix(images, order, lam, generator):
    H, W = images.shape[-2:]
    cut_h, cut_w = int(H * math.sqrt(1 - lam)), int(W * math.sqrt(1 - lam))
    cy = int(torch.randint(0, H, (1,), generator=generator, device=generator.device))
    cx = int(torch.randint(0, W, (1,), generator=generator, device=generator.device))
    y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, H)
    x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, W)
    mixed = images.clone()
    mixed[:, :, y0:y1, x0:x1] = images[order, :, y0:y1, x0:x1]
    return mixed, 1 - (y1 - y0) * (x1 - x0) / (H * W)


def mix_batch_on_device(
    images: torch.Tensor, targets: torch.Tensor, config: AugmentConfig, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``mix_batch`` with every draw left on the device: no Python number, so no host sync.

    The CPU path draws Python numbers (free on a CPU, and its seeded results stay as they
    were); on a GPU each would make the host wait for the device. Here the coin, the
    Beta(alpha, alpha) mixing weight and the CutMix box are tensors, the box a mask.
    """
    B, H, W = len(images), *images.shape[-2:]
    device = images.device
    both = config.mixup_alpha > 0 and config.cutmix_alpha > 0
    use_mixup = (
        torch.rand((), generator=generator, device=device) < 0.5
        if both
        else torch.full((), config.mixup_alpha > 0, device=device)
    )
    alpha = torch.where(use_mixup, config.mixup_alpha, config.cutmix_alpha).expand(2)
    # The one gamma sampler that takes a generator: Beta(a, a) = G1 / (G1 + G2).
    g1, g2 = torch._standard_gamma(alpha.float(), generator=generator)
    lam = g1 / (g1 + g2)
    order = torch.randperm(B, generator=generator, device=device)
    box = _cutmix_box(H, W, lam, generator) & ~use_mixup  # (H, W) True where pasted
    mixed = torch.where(
        use_mixup, images * lam + images[order] * (1 - lam), torch.where(box, images[order], images)
    )
    lam = torch.where(use_mixup, lam, 1 - box.float().mean())
    return mixed, targets * lam + targets[order] * (1 - lam)


def _cutmix_box(H: int, W: int, lam: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """(H, W) bool mask of ``_cutmix``'s box: side sqrt(1 - lam), centred at random."""
    device = lam.device
    cut_h = torch.floor(H * torch.sqrt(1 - lam))
    cut_w = torch.floor(W * torch.sqrt(1 - lam))
    cy = torch.randint(0, H, (), generator=generator, device=device)
    cx = torch.randint(0, W, (), generator=generator, device=device)
    rows = torch.arange(H, device=device)
    cols = torch.arange(W, device=device)
    inside_y = (rows >= cy - torch.div(cut_h, 2, rounding_mode="floor")) & (
        rows < cy + torch.div(cut_h, 2, rounding_mode="floor")
    )
    inside_x = (cols >= cx - torch.div(cut_w, 2, rounding_mode="floor")) & (
        cols < cx + torch.div(cut_w, 2, rounding_mode="floor")
    )
    return inside_y[:, None] & inside_x[None, :]


def one_hot(labels: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """(B,) int -> (B, classes) float; label smoothing spreads ``smoothing`` over all classes."""
    targets = F.one_hot(labels, num_classes).float()
    return targets * (1 - smoothing) + smoothing / num_classes
