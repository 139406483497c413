"""Batched augmentation: every image gets its own random parameters, in a few tensor ops.

No per-image Python runs in the training loop. Flips and integer shifts are cheap index
operations; rotation and zoom share one ``affine_grid``/``grid_sample`` call, and only run
when enabled. All randomness comes from an explicit ``torch.Generator`` so a seed (and a
saved generator state, on resume) fixes it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from cifar100.config.schema import AugmentConfig


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 in [0, 1]."""
    return images.float().div_(255.0)


def _uniform(n: int, low: float, high: float, generator, device) -> torch.Tensor:
    return torch.rand(n, generator=generator, device=device) * (high - low) + low


@dataclass(frozen=True)
class AugmentParams:
    """Every image's random draws (None: that op is off). Applying the same draws again
    repeats an augmentation exactly: the distillation cache stores a teacher's logits for
    views drawn once (``training.distill.teacher_cache``) and shows the student those views."""

    flip: torch.Tensor | None = None  # (B,) bool
    angle: torch.Tensor | None = None  # (B,) radians
    scale: torch.Tensor | None = None  # (B,) >1 zooms out
    dy: torch.Tensor | None = None  # (B,) int64 in [0, 2 * translate]
    dx: torch.Tensor | None = None
    contrast: torch.Tensor | None = None  # (B,) factor

    def map(self, fn) -> AugmentParams:
        """``fn`` applied to every draw that is there (index, stack, move)."""
        return AugmentParams(
            **{f.name: _maybe(fn, getattr(self, f.name)) for f in dataclasses.fields(self)}
        )


def _maybe(fn, value):
    return None if value is None else fn(value)


def draw_augment(
    n: int, config: AugmentConfig, generator: torch.Generator, device=None
) -> AugmentParams:
    """The draws of ``augment_batch`` for ``n`` images, in its order (the same seed gives
    the same images as before the draws were separated from their use)."""
    device = device if device is not None else generator.device
    flip = angle = scale = dy = dx = contrast = None
    if config.flip:
        flip = torch.rand(n, generator=generator, device=device) < 0.5
    if config.rotation > 0 or config.zoom > 0:
        angle = _uniform(n, -config.rotation, config.rotation, generator, device) * (math.pi / 180)
        scale = 1.0 / _uniform(n, 1 - config.zoom, 1 + config.zoom, generator, device)
    if config.translate > 0:
        dy = torch.randint(0, 2 * config.translate + 1, (n,), generator=generator, device=device)
        dx = torch.randint(0, 2 * config.translate + 1, (n,), generator=generator, device=device)
    if config.contrast > 0:
        contrast = _uniform(n, 1 - config.contrast, 1 + config.contrast, generator, device)
    return AugmentParams(flip, angle, scale, dy, dx, contrast)


def apply_augment(
    images: torch.Tensor, config: AugmentConfig, params: AugmentParams
) -> torch.Tensor:
    """float [0, 1] (B, 3, H, W) -> the images augmented with ``params``' draws."""
    if params.flip is not None:
        images = flip_where(images, params.flip)
    if params.angle is not None:
        images = affine_by(images, params.angle, params.scale)
    if params.dy is not None:
        images = translate_by(images, config.translate, params.dy, params.dx)
    if params.contrast is not None:
        images = contrast_by(images, params.contrast)
    return images


def flip_where(images: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    return torch.where(flip[:, None, None, None], images.flip(3), images)


def random_flip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return flip_where(
        images, torch.rand(len(images), generator=generator, device=images.device) < 0.5
    )


def translate_by(
    images: torch.Tensor, pad: int, dy: torch.Tensor, dx: torch.Tensor
) -> torch.Tensor:
    """Reflect-pad by ``pad`` and crop back at offsets ``dy``, ``dx`` (B,) per image."""
    B, C, H, W = images.shape
    padded = F.pad(images, (pad, pad, pad, pad), mode="reflect")  # (B, C, H+2p, W+2p)
    rows = dy[:, None] + torch.arange(H, device=images.device)  # (B, H)
    cols = dx[:, None] + torch.arange(W, device=images.device)  # (B, W)
    flat = rows[:, :, None] * (W + 2 * pad) + cols[:, None, :]  # (B, H, W)
    index = flat.view(B, 1, H * W).expand(B, C, H * W)
    return padded.flatten(2).gather(2, index).view(B, C, H, W)


def random_translate(images: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Reflect-pad by ``pad`` and crop back at a random offset per image (a random crop)."""
    B, device = len(images), images.device
    dy = torch.randint(0, 2 * pad + 1, (B,), generator=generator, device=device)
    dx = torch.randint(0, 2 * pad + 1, (B,), generator=generator, device=device)
    return translate_by(images, pad, dy, dx)


def affine_by(images: torch.Tensor, angle: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Rotate by ``angle`` (radians) and scale by ``scale`` per image, reflecting edges."""
    B = len(images)
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    zeros = torch.zeros_like(cos)
    theta = torch.stack([cos, -sin, zeros, sin, cos, zeros], dim=1).view(B, 2, 3)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(
        images, grid, mode="bilinear", padding_mode="reflection", align_corners=False
    )


def random_affine(
    images: torch.Tensor, rotation: float, zoom: float, generator: torch.Generator
) -> torch.Tensor:
    """Rotate by up to +-``rotation`` degrees and zoom by up to +-``zoom``, reflecting edges."""
    B = len(images)
    angle = _uniform(B, -rotation, rotation, generator, images.device) * (math.pi / 180)
    scale = 1.0 / _uniform(B, 1 - zoom, 1 + zoom, generator, images.device)  # >1 zooms out
    return affine_by(images, angle, scale)


def contrast_by(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Keras-style RandomContrast: scale each image's deviation from its channel means."""
    mean = images.mean(dim=(2, 3), keepdim=True)
    return ((images - mean) * factor[:, None, None, None] + mean).clamp_(0.0, 1.0)


def random_contrast(images: torch.Tensor, amount: float, generator: torch.Generator):
    """Keras-style RandomContrast: scale each image's deviation from its channel means."""
    factor = _uniform(len(images), 1 - amount, 1 + amount, generator, images.device)
    return contrast_by(images, factor)


def augment_batch(
    images: torch.Tensor, config: AugmentConfig, generator: torch.Generator
) -> torch.Tensor:
    """float [0, 1] (B, 3, H, W) -> augmented float [0, 1] (B, 3, H, W)."""
    params = draw_augment(len(images), config, generator, images.device)
    return apply_augment(images, config, params)


# Sizes move in steps of 4 px: fewer distinct input shapes (each one costs oneDNN, cuDNN
# or torch.compile a new kernel plan), and a 2x2 pooling twice still divides them evenly.
RESIZE_STEP = 4


@dataclass(frozen=True)
class ResizeSchedule:
    """Progressive resizing (fast.ai; EfficientNetV2's progressive learning): the first
    ``epochs`` epochs see the batch shrunk, from ``start`` px rising to ``full`` px, so the
    early epochs, which learn coarse features, cost a fraction of the pixels."""

    start: int
    epochs: int
    full: int  # the model's own input size, reached at epoch ``epochs``

    def size_at(self, epoch: int) -> int:
        """The side length for epoch ``epoch`` (0-based); depends on the epoch alone, so a
        resumed run trains each epoch at the size it had."""
        if epoch >= self.epochs:
            return self.full
        size = self.start + (self.full - self.start) * epoch // self.epochs
        return max(self.start, size - size % RESIZE_STEP)


def resize_batch(images: torch.Tensor, size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, size, size), antialiased as a photo is shrunk: plain bilinear
    sampling would alias, and the model would learn textures it never sees at full size."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    resized = F.interpolate(
        images, size=(size, size), mode="bilinear", antialias=True, align_corners=False
    )
    return resized.contiguous(memory_format=torch.channels_last)


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
