"""Evaluation metrics from predicted probabilities: no plotting, no files.

Everything works on NumPy arrays: ``probs`` (N, C) rows summing to 1 and ``labels`` (N,)
integers. The classification report follows scikit-learn's ``classification_report``
with ``zero_division=0`` (a class that is never predicted has precision 0, not NaN), so
the numbers can be checked against it; scikit-learn itself is only a test dependency.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

ECE_BINS = 15


def softmax(logits: torch.Tensor | np.ndarray) -> np.ndarray:
    """(N, C) probabilities in float64, computed stably."""
    logits = torch.as_tensor(logits, dtype=torch.float64)
    return torch.softmax(logits, dim=1).numpy()


def ensemble_probs(
    logits_per_model: list[torch.Tensor | np.ndarray], weights: list[float] | None = None
) -> np.ndarray:
    """Average of each model's softmax probabilities (not of their logits: models trained
    apart have logits on different scales, probabilities are comparable), weighted by
    ``weights`` (e.g. how often a greedy selection picked each) when given."""
    if not logits_per_model:
        raise ValueError("an ensemble needs at least one model")
    return np.average([softmax(logits) for logits in logits_per_model], axis=0, weights=weights)


def topk_accuracy(probs: np.ndarray, labels: np.ndarray, k: int) -> float:
    top = np.argsort(-probs, axis=1, kind="stable")[:, :k]  # (N, k)
    return float((top == labels[:, None]).any(axis=1).mean())


def nll(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood of the true class (the test loss)."""
    picked = probs[np.arange(len(labels)), labels]
    return float(-np.log(np.clip(picked, 1e-12, None)).mean())


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, C) counts: row = true class, column = predicted class."""
    flat = np.asarray(labels, dtype=np.int64) * num_classes + np.asarray(preds, dtype=np.int64)
    return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def _safe_divide(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    out = np.zeros_like(num, dtype=np.float64)
    np.divide(num, den, out=out, where=den > 0)
    return out


def classification_report(matrix: np.ndarray, names: list[str]) -> dict[str, Any]:
    """Per-class precision, recall, F1 and support; accuracy; macro and weighted averages."""
    tp = np.diag(matrix).astype(np.float64)
    support = matrix.sum(axis=1)
    predicted = matrix.sum(axis=0)
    precision = _safe_divide(tp, predicted.astype(np.float64))
    recall = _safe_divide(tp, support.astype(np.float64))
    f1 = _safe_divide(2 * precision * recall, precision + recall)
    classes = [
        {"name": name, "precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
        for name, p, r, f, s in zip(names, precision, recall, f1, support, strict=True)
    ]
    total = int(support.sum())
    weights = support / max(total, 1)
    return {
        "classes": classes,
        "accuracy": float(tp.sum() / max(total, 1)),
        "macro_avg": {
            "precision": float(precision.mean()),
            "recall": float(recall.mean()),
            "f1": float(f1.mean()),
            "support": total,
        },
        "weighted_avg": {
            "precision": float(weights @ precision),
            "recall": float(weights @ recall),
            "f1": float(weights @ f1),
            "support": total,
        },
    }


def calibration(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> dict[str, Any]:
    """Expected calibration error over ``bins`` equal-width confidence bins.

    A prediction with confidence c falls in bin (lo, hi] (Guo et al., 2017); ECE is the
    support-weighted mean gap |accuracy - mean confidence| over the bins.
    """
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    # searchsorted(side="left") puts c into the bin whose upper edge is the first >= c.
    index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    rows, ece = [], 0.0
    for b in range(bins):
        members = index == b
        count = int(members.sum())
        acc = float(correct[members].mean()) if count else 0.0
        conf = float(confidence[members].mean()) if count else 0.0
        ece += count / len(labels) * abs(acc - conf)
        rows.append(
            {
                "lo": float(edges[b]),
                "hi": float(edges[b + 1]),
                "count": count,
                "accuracy": acc,
                "confidence": conf,
            }
        )
    return {
        "ece": float(ece),
        "num_bins": bins,
        "bins": rows,
        "mean_confidence": float(confidence.mean()),
    }


def class_order(fine_to_coarse: list[int]) -> list[int]:
    """Fine classes sorted by superclass (then index), so related classes sit together."""
    return sorted(range(len(fine_to_coarse)), key=lambda c: (fine_to_coarse[c], c))


def most_confused(matrix: np.ndarray, names: list[str], top: int = 20) -> list[dict[str, Any]]:
    """The largest off-diagonal cells: which true class is taken for which, how often."""
    off = matrix.copy()
    np.fill_diagonal(off, 0)
    flat = np.argsort(-off, axis=None, kind="stable")[:top]
    support = matrix.sum(axis=1)
    pairs = []
    for true, pred in zip(*np.unravel_index(flat, off.shape), strict=True):
        count = int(off[true, pred])
        if count == 0:
            break
        pairs.append(
            {
                "true": names[true],
                "predicted": names[pred],
                "count": count,
                "share": count / int(support[true]),
            }
        )
    return pairs


def build_report(
    probs: np.ndarray,
    labels: np.ndarray,
    class_names: list[str],
    superclass_names: list[str],
    fine_to_coarse: list[int],
    top_pairs: int = 20,
) -> dict[str, Any]:
    """Every number of the evaluation report, JSON-ready."""
    labels = np.asarray(labels, dtype=np.int64)
    preds = probs.argmax(axis=1)
    coarse = np.asarray(fine_to_coarse, dtype=np.int64)
    fine_matrix = confusion_matrix(labels, preds, len(class_names))
    coarse_matrix = confusion_matrix(coarse[labels], coarse[preds], len(superclass_names))
    report = classification_report(fine_matrix, class_names)
    calib = calibration(probs, labels)
    return {
        "images": len(labels),
        "top1": topk_accuracy(probs, labels, 1),
        "top5": topk_accuracy(probs, labels, 5),
        "nll": nll(probs, labels),
        # A fine prediction counts as right when it lands in the true superclass.
        "superclass_accuracy": float((coarse[preds] == coarse[labels]).mean()),
        "ece": calib["ece"],
        "macro_f1": report["macro_avg"]["f1"],
        "classification_report": report,
        "superclass_report": classification_report(coarse_matrix, superclass_names),
        "most_confused": most_confused(fine_matrix, class_names, top_pairs),
        "calibration": calib,
        "class_names": class_names,
        "superclass_names": superclass_names,
        "fine_to_coarse": [int(c) for c in coarse],
        "class_order": class_order(list(coarse)),
        "confusion_matrix": fine_matrix.tolist(),
        "superclass_confusion_matrix": coarse_matrix.tolist(),
    }


def misclassified(
    probs: np.ndarray, labels: np.ndarray, class_names: list[str], count: int = 32
) -> list[dict[str, Any]]:
    """The most confident mistakes, at most one per true class so the grid shows variety."""
    preds = probs.argmax(axis=1)
    confidence = probs.max(axis=1)
    wrong = np.nonzero(preds != labels)[0]
    chosen, seen = [], set()
    for index in wrong[np.argsort(-confidence[wrong], kind="stable")]:
        if int(labels[index]) in seen:
            continue
        seen.add(int(labels[index]))
        chosen.append(
            {
                "index": int(index),
                "true": class_names[labels[index]],
                "predicted": class_names[preds[index]],
                "confidence": float(confidence[index]),
            }
        )
        if len(chosen) == count:
            break
    return chosen


def tta_note(report: dict[str, Any]) -> str:
    """'flip TTA', 'flip + shift 1 TTA', ...; '' without test-time augmentation."""
    views = ["flip"] * bool(report.get("tta_flip"))
    if report.get("tta_translate"):
        views.append(f"shift {report['tta_translate']}")
    return " + ".join(views) + " TTA" if views else ""
