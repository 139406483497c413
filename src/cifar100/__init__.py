"""cifar100: train, evaluate, compare and ship CIFAR-100 classifiers.

The Python API (``cifar100.train``, ``cifar100.load_model``, ``cifar100.evaluate``, ...)
lives in ``cifar100.api``; its names are imported on first use (PEP 562), so that
``import cifar100`` and ``cifar100 --help`` do not load PyTorch before they need it.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

API = (
    "Classifier",
    "Config",
    "Prediction",
    "UserError",
    "compare",
    "evaluate",
    "export",
    "load_config",
    "load_data",
    "load_model",
    "load_record",
    "make_record",
    "make_splits",
    "new_run_dir",
    "read_image",
    "train",
)


def __getattr__(name: str) -> Any:
    if name in API:
        return getattr(importlib.import_module("cifar100.api"), name)
    raise AttributeError(f"module 'cifar100' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *API])
