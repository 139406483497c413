"""``select_device``: which device a command runs on when the user says ``auto``."""

from __future__ import annotations

import torch


def select_device(name: str = "auto") -> torch.device:
    """``name`` as a device; ``auto``: CUDA, else Apple's MPS, else the CPU."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")
