"""Temperature scaling (Guo et al., 2017): one number T, fitted on the validation split.

Dividing the logits by T changes no prediction (the arg-max stays) and rescales every
confidence. Label smoothing trains under-confident networks (ECE of 10-20% on the quick
recipe), over-fitted ones are over-confident; T > 1 softens, T < 1 sharpens. T is fitted
on the validation split, never on the test set, so the test-set ECE after scaling is an
honest measurement. ``cifar100 evaluate`` writes it to ``RUN/calibration.json``;
``predict --calibrated`` and ``export --calibrated`` read it from there.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from cifar100.evaluation.metrics import calibration, softmax
from cifar100.runs.temperature import save_calibration

LOG_BETA_RANGE = (math.log(1 / 20), math.log(20))  # T between 0.05 and 20


def nll_at(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> float:
    return F.cross_entropy(logits.double() / temperature, labels).item()


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, iterations: int = 80) -> float:
    """The T that minimises the negative log-likelihood of ``labels`` under ``logits / T``.

    The NLL is convex in 1/T, so a golden-section search over log(1/T) finds the minimum
    deterministically, with no learning rate to tune and no risk of a negative T.
    """
    logits, labels = logits.double(), labels.long()
    lo, hi = LOG_BETA_RANGE
    ratio = (math.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)

    def loss(log_beta: float) -> float:
        return nll_at(logits, labels, math.exp(-log_beta))

    fa, fb = loss(a), loss(b)
    for _ in range(iterations):
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = loss(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = loss(b)
    return math.exp(-(lo + hi) / 2)


def fit_run(
    checkpoint: Path,
    plain: torch.Tensor,
    viewed: torch.Tensor,
    labels: torch.Tensor,
    split: dict[str, Any],
) -> dict[str, Any]:
    """Fit T on the run's own validation split and write RUN/calibration.json.

    ``plain``: the checkpoint's validation logits; ``viewed``: the same with the report's
    TTA views averaged (``plain`` itself without TTA); ``split``: its split_seed,
    val_fraction and val_images. The file keeps the temperature of the plain logits (what
    predict and export compute); the returned one fits the logits the report uses.
    """
    augmented = viewed is not plain

    def ece(logits: torch.Tensor, temperature: float) -> float:
        return calibration(softmax(logits / temperature), labels.numpy())["ece"]

    t_plain = fit_temperature(plain, labels)
    t_view = fit_temperature(viewed, labels) if augmented else t_plain
    save_calibration(
        checkpoint,
        {
            "temperature": t_plain,
            "fitted_on": "validation split",
            **split,
            "tta_flip": False,
            "val_nll_before": nll_at(plain, labels, 1.0),
            "val_nll_after": nll_at(plain, labels, t_plain),
            "val_ece_before": ece(plain, 1.0),
            "val_ece_after": ece(plain, t_plain),
        },
    )
    fit = {
        "temperature": t_view,
        **split,
        "val_ece_before": ece(viewed, 1.0),
        "val_ece_after": ece(viewed, t_view),
    }
    return fit
