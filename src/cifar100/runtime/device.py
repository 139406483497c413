"""Devices: ``check_device`` (does this machine have the one asked for) and ``select_device``
(which one a command runs on when the user says ``auto``)."""

from __future__ import annotations

import re

import torch

from cifar100.config.schema import ConfigError


def select_device(name: str = "auto") -> torch.device:
    """``name`` as a device; ``auto``: CUDA, else Apple's MPS, else the CPU."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


DEVICE_PATTERN = re.compile(r"(auto|cpu|mps|cuda(:\d+)?)")


def check_device(name: str) -> str:
    """``name`` if this machine has that device, else a one-line error saying why not."""
    if not DEVICE_PATTERN.fullmatch(name):
        raise ConfigError(f"unknown device '{name}' (choose from auto, cpu, cuda, cuda:N, mps)")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device '{name}': CUDA is not available on this machine "
                f"(PyTorch {torch.__version__}); use --device cpu or auto"
            )
        index = int(name.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise ConfigError(
                f"device '{name}': this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    mps = getattr(torch.backends, "mps", None)
    if name == "mps" and not (mps and mps.is_available()):
        raise ConfigError("device 'mps': Apple's Metal backend is not available here")
    return name
