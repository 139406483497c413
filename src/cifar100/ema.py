"""``ModelEma``: an exponential moving average of a model's weights, updated every step."""

from __future__ import annotations

import copy

import torch
from torch import nn


class ModelEma:
    """Exponential moving average of the weights (buffers copied), for smoother evaluation."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for ema, live in zip(
            self.model.state_dict().values(), model.state_dict().values(), strict=True
        ):
            if ema.dtype.is_floating_point:
                ema.lerp_(live, 1.0 - self.decay)
            else:
                ema.copy_(live)
