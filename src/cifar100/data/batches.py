"""``ImageBatches``: the batches of one split, served from memory, augmented as a whole.

Data never leaves memory: uint8 image tensors are indexed by a seeded permutation,
converted and augmented as whole batches on the device they live on (on a GPU the split
is copied there once). That keeps per-image Python out of the hot loop, which on a 2-core
CPU is worth more than any data-loader worker, and on a GPU leaves no copy per step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from cifar100.config.schema import AugmentConfig
from cifar100.data.augment import augment_batch, to_float
from cifar100.data.cifar import Split
from cifar100.data.preprocess import Preprocess

# Above ~1 GB per activation tensor glibc serves memory the tuned allocator cannot keep
# (cifar100.runtime.allocator), and every batch faults it in again: a 160 px MobileNetV2 batch of
# 500 ran at 270 img/s with 0.56 M page faults per batch, one of 250 at 391 img/s with 23 k.
# Inference batches are capped at this many input pixels (250 images at 160 px).
MAX_BATCH_PIXELS = 250 * 160 * 160


def capped_batch(batch_size: int, image_size: int) -> int:
    """``batch_size``, lowered so a batch holds at most ``MAX_BATCH_PIXELS`` input pixels."""
    return max(1, min(batch_size, MAX_BATCH_PIXELS // (image_size * image_size)))


def shifted(images: torch.Tensor, shift: int) -> torch.Tensor:
    """(B, C, H, W) images moved ``shift`` pixels down and right (negative: up and left),
    the uncovered border filled by reflection, as the training translation does."""
    n = abs(shift)
    padded = F.pad(images, (n, n, n, n), mode="reflect")
    start, (height, width) = n - shift, images.shape[-2:]
    return padded[..., start : start + height, start : start + width]


class Batches(Protocol):
    """What training and inference read from a split, whatever serves it: ``ImageBatches``
    (images), ``training.features.FeatureBatches`` (a frozen backbone's cached features),
    ``training.distill.teacher_cache.ViewBatches`` (cached teacher views) and
    ``runtime.distributed.Shard`` (one rank's slice of any of them)."""

    device: torch.device

    @property
    def labels(self) -> torch.Tensor: ...  # (N,) on the device the rows are indexed on

    def __len__(self) -> int: ...

    def get(
        self,
        indices: torch.Tensor,
        generator: torch.Generator | None = None,
        flip: bool = False,
        shift: int = 0,
    ) -> torch.Tensor:
        """Model inputs for rows ``indices``: a training view with a generator, else the
        stored one, mirrored (``flip``) or moved (``shift``) for test-time augmentation."""
        ...


@dataclass
class ImageBatches:
    """Serves (inputs, labels) batches from a uint8 split that lives on ``device``.

    On a GPU the split is copied there once (the whole training set is 150 MB as uint8):
    batches are then indexed, converted and augmented on the GPU, with no data-loader
    workers and no host-to-device copy per step. On CPU nothing moves.
    """

    split: Split
    preprocess: Preprocess
    device: torch.device
    augment: AugmentConfig | None = None

    def __post_init__(self) -> None:
        self.split = self.split.to(self.device)

    def __len__(self) -> int:
        return len(self.split)

    @property
    def labels(self) -> torch.Tensor:
        return self.split.labels  # on the device, like the images: index both there

    def get(
        self,
        indices: torch.Tensor,
        generator: torch.Generator | None = None,
        flip: bool = False,
        shift: int = 0,
    ) -> torch.Tensor:
        """Model inputs for rows ``indices``: augmented when a generator is given (training),
        else as stored, or mirrored (``flip``) or moved diagonally (``shift``) for TTA."""
        images = to_float(self.split.images[indices])  # (B, 3, 32, 32) float on the device
        if generator is not None:
            images = self.augmented(images, indices, generator)
        if flip:
            images = images.flip(3)
        if shift:
            images = shifted(images, shift)
        images = self.preprocess(images)
        return images.contiguous(memory_format=torch.channels_last)

    def augmented(
        self, images: torch.Tensor, indices: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        """The training view of ``images`` (rows ``indices`` of the split): a fresh random
        augmentation per batch here; cached teacher views in ``ViewBatches``."""
        return images if self.augment is None else augment_batch(images, self.augment, generator)
