"""``ModelEma``: an exponential moving average of a model's weights, updated every step.

A fixed decay near 1 makes the average remember the random initialisation for thousands
of steps (0.999 weighs the first weights by e^-1 after 1,000 steps), which is why an EMA
evaluated in a short CPU run can look worse than the live model. A warm-up of the decay
(``train.ema_warmup``) starts near 0 and rises to ``decay``, so the average only ever
spans the recent past: ``"tf"`` is TensorFlow's ``ExponentialMovingAverage(num_updates=t)``
rule, ``min(decay, (1 + t) / (10 + t))``; ``"timm"`` is timm's ``ModelEmaV3`` warm-up,
``min(decay, 1 - (1 + t) ** -0.75)`` (gamma 1, power 3/4: its advice for runs shorter
than about a million steps); ``"mean"`` is the plain mean of the weights so far,
``min(decay, t / (1 + t))``, until the average spans ``1 / (1 - decay)`` steps. None keeps
the decay fixed.

``span_decay`` sizes the decay to a run (``train.ema_span``): an average over the last
share of its steps whatever its length, so a 15-epoch run is not judged on weights a
200-epoch decay still remembers from its first epochs.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from cifar100.config.limits import EMA_WARMUPS

TIMM_POWER = 0.75


def span_decay(span: float, steps: int) -> float:
    """The decay whose average spans ``span`` of ``steps`` (1 / (1 - decay) steps)."""
    return 1.0 - 1.0 / max(1.0, span * steps)


def warmup_decay(decay: float, warmup: str | None, updates: int) -> float:
    """The decay of update number ``updates`` (0 for the first) under ``warmup``."""
    if warmup == "mean":
        return min(decay, updates / (1 + updates))
    if warmup == "tf":
        return min(decay, (1 + updates) / (10 + updates))
    if warmup == "timm":
        return min(decay, 1 - (1 + updates) ** -TIMM_POWER)
    return decay


class ModelEma:
    """Exponential moving average of the weights (buffers copied), for smoother evaluation.

    ``updates`` counts the steps averaged so far; the loop saves it with the average, so a
    resumed run continues the warm-up where it stood.
    """

    def __init__(self, model: nn.Module, decay: float, warmup: str | None = None):
        if warmup is not None and warmup not in EMA_WARMUPS:
            raise ValueError(f"unknown EMA warm-up '{warmup}' (choose from {EMA_WARMUPS})")
        self.decay, self.warmup, self.updates = decay, warmup, 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @property
    def current_decay(self) -> float:
        """The decay the next update uses."""
        return warmup_decay(self.decay, self.warmup, self.updates)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        weight = 1.0 - self.current_decay
        for ema, live in zip(
            self.model.state_dict().values(), model.state_dict().values(), strict=True
        ):
            if ema.dtype.is_floating_point:
                ema.lerp_(live, weight)
            else:
                ema.copy_(live)
        self.updates += 1
