"""Evaluation metrics checked against scikit-learn and against hand-made cases."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from cifar100.evaluation.metrics import (
    build_report,
    calibration,
    class_order,
    classification_report,
    confusion_matrix,
    ensemble_probs,
    misclassified,
    most_confused,
    nll,
    softmax,
    topk_accuracy,
)
from cifar100.evaluation.report import html, markdown, plots


def _random_case(num_classes: int, n: int, seed: int, never_predicted: int):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, size=n)
    # Mostly right, so precision and recall vary per class; one class is never predicted.
    preds = np.where(rng.random(n) < 0.6, labels, rng.integers(0, num_classes, size=n))
    preds[preds == never_predicted] = (never_predicted + 1) % num_classes
    return labels, preds


@pytest.mark.parametrize(("num_classes", "n", "seed"), [(10, 300, 0), (100, 2000, 1)])
def test_classification_report_equals_sklearn(num_classes, n, seed):
    labels, preds = _random_case(num_classes, n, seed, never_predicted=3)
    names = [f"c{i}" for i in range(num_classes)]
    ours = classification_report(confusion_matrix(labels, preds, num_classes), names)
    ref = skm.classification_report(
        labels,
        preds,
        labels=list(range(num_classes)),
        target_names=names,
        output_dict=True,
        zero_division=0,
    )
    for row in ours["classes"]:
        expected = ref[row["name"]]
        assert row["precision"] == pytest.approx(expected["precision"], abs=1e-12)
        assert row["recall"] == pytest.approx(expected["recall"], abs=1e-12)
        assert row["f1"] == pytest.approx(expected["f1-score"], abs=1e-12)
        assert row["support"] == expected["support"]
    for ours_key, ref_key in (("macro_avg", "macro avg"), ("weighted_avg", "weighted avg")):
        for key, ref_name in (("precision", "precision"), ("recall", "recall"), ("f1", "f1-score")):
            assert ours[ours_key][key] == pytest.approx(ref[ref_key][ref_name], abs=1e-12)
        assert ours[ours_key]["support"] == n
    assert ours["accuracy"] == pytest.approx(ref["accuracy"], abs=1e-12)


def test_class_never_predicted_scores_zero_not_nan():
    labels = np.array([0, 0, 1, 1, 2, 2])
    preds = np.array([0, 1, 1, 1, 0, 0])  # class 2 is never predicted, never right
    report = classification_report(confusion_matrix(labels, preds, 4), list("abcd"))
    never, absent = report["classes"][2], report["classes"][3]  # d: no images at all
    assert (never["precision"], never["recall"], never["f1"]) == (0.0, 0.0, 0.0)
    assert (absent["precision"], absent["recall"], absent["support"]) == (0.0, 0.0, 0)
    values = [v for row in report["classes"] for v in row.values() if isinstance(v, float)]
    assert not any(math.isnan(v) for v in values)
    assert report["macro_avg"]["precision"] == pytest.approx((1 / 3 + 2 / 3) / 4)


def test_confusion_matrix_and_topk_equal_sklearn():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(500, 20))
    labels = rng.integers(0, 20, size=500)
    probs = softmax(logits)
    preds = probs.argmax(axis=1)
    np.testing.assert_array_equal(
        confusion_matrix(labels, preds, 20), skm.confusion_matrix(labels, preds, labels=range(20))
    )
    for k in (1, 5):
        assert topk_accuracy(probs, labels, k) == pytest.approx(
            skm.top_k_accuracy_score(labels, probs, k=k, labels=range(20))
        )
    assert nll(probs, labels) == pytest.approx(skm.log_loss(labels, probs, labels=range(20)))


def _probs_with_confidence(confidences: list[float], classes: int = 3) -> np.ndarray:
    """Rows whose top probability (class 0) is the given confidence."""
    rows = [[c] + [(1 - c) / (classes - 1)] * (classes - 1) for c in confidences]
    return np.array(rows)


def test_ece_zero_when_confidence_matches_accuracy():
    probs = _probs_with_confidence([1.0, 1.0, 1.0])
    assert calibration(probs, np.zeros(3, dtype=int))["ece"] == pytest.approx(0.0)
    # Confidence 0.75 and three right out of four: calibrated in its bin.
    probs = _probs_with_confidence([0.75] * 4)
    assert calibration(probs, np.array([0, 0, 0, 1]))["ece"] == pytest.approx(0.0)


def test_ece_hand_computed():
    # One bin: confidence 0.9, half right -> gap 0.4.
    probs = _probs_with_confidence([0.9] * 4)
    assert calibration(probs, np.array([0, 0, 1, 2]))["ece"] == pytest.approx(0.4)
    # Two bins of equal weight: 0.95 all right (gap 0.05), 0.55 all wrong (gap 0.55).
    probs = _probs_with_confidence([0.95, 0.95, 0.55, 0.55])
    result = calibration(probs, np.array([0, 0, 1, 1]))
    assert result["ece"] == pytest.approx(0.5 * 0.05 + 0.5 * 0.55)
    assert result["num_bins"] == 15 and len(result["bins"]) == 15
    filled = [b for b in result["bins"] if b["count"]]
    assert [(b["count"], b["accuracy"]) for b in filled] == [(2, 0.0), (2, 1.0)]
    assert filled[0]["lo"] < 0.55 <= filled[0]["hi"] and filled[1]["lo"] < 0.95 <= filled[1]["hi"]


def test_superclass_accuracy_counts_a_fine_miss_inside_the_true_superclass():
    fine_to_coarse = [0, 0, 1, 1]
    labels = np.array([0, 1, 2, 3])
    probs = np.eye(4)[[1, 1, 3, 0]]  # predictions 1, 1, 3, 0
    report = build_report(probs, labels, list("abcd"), ["AB", "CD"], fine_to_coarse)
    assert report["top1"] == 0.25
    assert report["superclass_accuracy"] == 0.75  # only 3 -> 0 leaves its superclass
    assert report["superclass_confusion_matrix"] == [[2, 0], [1, 1]]
    assert report["superclass_report"]["accuracy"] == 0.75
    assert [c["support"] for c in report["superclass_report"]["classes"]] == [2, 2]


def test_class_order_groups_by_superclass():
    assert class_order([1, 0, 1, 0]) == [1, 3, 0, 2]


def test_ensemble_averages_probabilities_not_logits():
    confident = torch.tensor([[0.0, 20.0]])
    mild = torch.tensor([[2.0, 0.0]])
    probs = ensemble_probs([confident, mild, mild])
    expected = (softmax(confident) + 2 * softmax(mild)) / 3
    np.testing.assert_allclose(probs, expected)
    assert probs.argmax() == 0  # averaging logits would pick class 1: (4/3, 20/3)
    assert probs.sum() == pytest.approx(1.0)
    with pytest.raises(ValueError):
        ensemble_probs([])


def test_most_confused_and_misclassified():
    labels = np.array([0, 0, 0, 1, 1, 2])
    preds = np.array([1, 1, 0, 2, 1, 2])
    pairs = most_confused(confusion_matrix(labels, preds, 3), list("abc"), top=5)
    assert pairs == [
        {"true": "a", "predicted": "b", "count": 2, "share": 2 / 3},
        {"true": "b", "predicted": "c", "count": 1, "share": 0.5},
    ]
    probs = np.full((6, 3), 0.1)
    probs[np.arange(6), preds] = [0.6, 0.8, 0.8, 0.7, 0.8, 0.8]
    mistakes = misclassified(probs, labels, list("abc"))
    # one per true class, most confident first: a->b (index 1, 0.8), then b->c (0.7)
    assert [(m["index"], m["true"], m["predicted"]) for m in mistakes] == [
        (1, "a", "b"),
        (3, "b", "c"),
    ]


def test_figures_and_page_render_from_a_report():
    rng = np.random.default_rng(3)
    labels = np.repeat(np.arange(100), 3)
    probs = softmax(rng.normal(size=(300, 100)) + 4 * np.eye(100)[labels])
    report = build_report(
        probs,
        labels,
        [f"class_{i}" for i in range(100)],
        [f"super_{i}" for i in range(20)],
        [c // 5 for c in range(100)],
    )
    report.update(
        title="t", runs=["r"], models=["m"], tta_flip=False, data="d", created="now", commit="abc"
    )
    images = {
        "confusion": plots.fine_confusion_png(report),
        "reliability": plots.reliability_png(report["calibration"]),
    }
    assert all(png.startswith(b"\x89PNG") for png in images.values())
    page = html.render_html(report, images)
    assert page.count("data:image/png;base64,") == 2
    assert not re.search(r'(src|href)="(?!data:image/png;base64,|#)', page)  # all inline
    assert page.count("<tr>") == 100 + 20 + len(report["most_confused"]) + 3
    text = markdown.render_markdown(report, list(images))
    assert "![confusion](confusion.png)" in text and "| class_99 |" in text
