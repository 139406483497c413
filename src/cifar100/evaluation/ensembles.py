"""Choosing an ensemble's members on the validation split, never the test set.

Greedy forward selection with replacement (Caruana et al., ICML 2004): start from
nothing, add whichever candidate most improves the ensemble's validation top-1 (its
negative log-likelihood breaks ties), and stop when no candidate improves it. A run may
be picked more than once, which weights it; a weak or redundant run is left out. The
first pick is the best single run, so the chosen ensemble is never worse than it on
validation. Its validation figure is the one it was chosen on, so only the test set
measures it honestly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cifar100.data.cifar import Cifar100, make_splits
from cifar100.errors import UserError
from cifar100.evaluation.inference import InferenceSettings
from cifar100.evaluation.metrics import nll, softmax, topk_accuracy
from cifar100.evaluation.predictions import run_logits
from cifar100.runs.trained import TrainedModel


def greedy_selection(
    val_logits: list[np.ndarray], labels: np.ndarray, max_picks: int | None = None
) -> list[int]:
    """How many times each candidate was picked (its weight; 0: left out).

    Args:
        val_logits: each candidate's (N, C) validation logits, its TTA views averaged.
        labels: (N,) true classes.
        max_picks: at most this many picks (default: twice the number of candidates).
    """
    probs = [softmax(logits) for logits in val_logits]  # (N, C) each
    counts = [0] * len(probs)
    total = np.zeros_like(probs[0])
    best: tuple[float, float] | None = None
    for picks in range(max_picks or 2 * len(probs)):
        scores = [_score((total + p) / (picks + 1), labels) for p in probs]
        pick = max(range(len(probs)), key=lambda i: scores[i])  # first of equals: stable
        if best is not None and scores[pick] <= best:
            break
        counts[pick] += 1
        total += probs[pick]
        best = scores[pick]
    return counts


def _score(probs: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Top-1 first; a lower NLL among equal top-1s (10,000 images make ties common)."""
    return topk_accuracy(probs, labels, 1), -nll(probs, labels)


def selection_summary(
    candidates: list[str], val_logits: list[np.ndarray], labels: np.ndarray, counts: list[int]
) -> dict[str, Any]:
    """What a report keeps of a selection: every candidate, its validation top-1, its weight."""
    return {
        "method": "greedy forward selection with replacement on validation top-1 "
        "(Caruana et al., 2004)",
        "candidates": [
            {
                "run": run,
                "val_top1": topk_accuracy(softmax(logits), labels, 1),
                "weight": count,
            }
            for run, logits, count in zip(candidates, val_logits, counts, strict=True)
        ],
    }


def select_members(
    run_dirs: list[Path],
    models: list[TrainedModel],
    dataset: Cifar100,
    settings: InferenceSettings,
) -> tuple[list[Path], list[TrainedModel], list[int], dict[str, Any]]:
    """The runs a greedy selection keeps, their models and weights, and its summary.

    Candidates must share a validation split: one run's validation images would be
    another's training images, and the selection would favour the run that memorised them.
    """
    fraction, seed = shared_split(run_dirs, models)
    val = make_splits(dataset, fraction, seed).val
    val_logits = [
        run_logits(run_dir, model, val, "val", settings).numpy()
        for run_dir, model in zip(run_dirs, models, strict=True)
    ]
    labels = val.labels.numpy()
    counts = greedy_selection(val_logits, labels)
    summary = selection_summary([str(r) for r in run_dirs], val_logits, labels, counts)
    kept = [i for i, count in enumerate(counts) if count]
    weights = [counts[i] for i in kept]
    return [run_dirs[i] for i in kept], [models[i] for i in kept], weights, summary


def shared_split(run_dirs: list[Path], models: list[TrainedModel]) -> tuple[float, int]:
    """(val_fraction, split_seed) that every run was trained with; a UserError otherwise."""
    splits = {}
    for run_dir, model in zip(run_dirs, models, strict=True):
        split = model.validation_split
        if split is None:
            raise UserError(
                f"{run_dir}: trained on every training image (refit), so it has no "
                "validation images to be selected on"
            )
        splits.setdefault(split, run_dir)
    if len(splits) > 1:
        described = "; ".join(f"{run}: {f:g} with seed {s}" for (f, s), run in splits.items())
        raise UserError(
            f"--select needs runs that share a validation split (val_fraction and "
            f"split_seed), and these differ: {described}"
        )
    return next(iter(splits))
