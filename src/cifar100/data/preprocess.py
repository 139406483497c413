"""``Preprocess``: what stands between a 32x32 CIFAR image and a model's input.

Every model sees float images resized to its input size and normalised with its own
mean and std (``cifar100.models.ModelSpec``). Checkpoints record the three numbers, so
inference and export rebuild the very same module without the training config.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Preprocess(nn.Module):
    """float [0, 1] images at 32x32 -> the model's input: resized, normalised."""

    def __init__(self, size: int, mean, std, standardize: bool = True):
        super().__init__()
        self.size = size
        self.register_buffer(
            "mean", torch.tensor(mean if standardize else (0.0,) * 3).view(1, 3, 1, 1)
        )
        self.register_buffer(
            "std", torch.tensor(std if standardize else (1.0,) * 3).view(1, 3, 1, 1)
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-1] != self.size:
            images = F.interpolate(
                images,
                size=(self.size, self.size),
                mode="bilinear",
                align_corners=False,
                antialias=images.shape[-1] > self.size,
            )
        return (images - self.mean) / self.std
