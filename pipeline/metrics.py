"""The measures every stage agrees on: accuracy, macro-F1 and per-label figures of a labelled split,
the paired bootstrap that says whether two predictors of the same rows differ, and how well
confidences are calibrated (ECE, NLL). The calibration's choice of candidate and the evaluation
both use them."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from sklearn.metrics import accuracy_score, classification_report, f1_score


def classification_metrics(truth: list[str], predicted: list[str], labels: list[str]) -> dict[str, Any]:
    """Accuracy, macro-F1 over the labels present in truth or predictions, and per-label P/R/F1."""
    present = [l for l in labels if l in set(truth) | set(predicted)]
    report = classification_report(truth, predicted, labels=present, output_dict=True, zero_division=0)
    return {
        "accuracy": float(accuracy_score(truth, predicted)),
        "macro_f1": float(f1_score(truth, predicted, labels=present, average="macro", zero_division=0)),
        "n_eval": len(truth),
        "per_label": {
            l: {k: round(float(report[l][k]), 4) for k in ("precision", "recall", "f1-score", "support")}
            for l in present
        },
    }


def paired_bootstrap(truth: list[str], ours: list[str], theirs: list[str], labels: list[str],
                     resamples: int = 1000, seed: int = 0) -> dict[str, dict[str, float]]:
    """The difference ours - theirs in accuracy and macro-F1, with its 95% interval from resampling
    the same rows for both (paired), so that rows both get right or wrong do not widen it."""
    index = {label: i for i, label in enumerate(labels)}
    t, a, b = (np.array([index[x] for x in column]) for column in (truth, ours, theirs))
    n, k = len(t), len(labels)
    counts = np.random.default_rng(seed).multinomial(n, np.full(n, 1 / n), size=resamples)  # row weights

    def accuracy(predicted: np.ndarray) -> np.ndarray:
        return counts @ (predicted == t) / n

    def macro_f1(predicted: np.ndarray) -> np.ndarray:
        hit = (predicted == t)
        true_positive = np.stack([counts @ (hit & (t == c)) for c in range(k)], 1)
        truth_count = np.stack([counts @ (t == c) for c in range(k)], 1)
        predicted_count = np.stack([counts @ (predicted == c) for c in range(k)], 1)
        present = (truth_count + predicted_count) > 0
        f1 = np.divide(2 * true_positive, truth_count + predicted_count,
                       out=np.zeros_like(true_positive, dtype=float), where=present)
        return (f1 * present).sum(1) / present.sum(1)

    result = {}
    for name, measure in (("accuracy", accuracy), ("macro_f1", macro_f1)):
        differences = measure(a) - measure(b)
        point = classification_metrics(truth, ours, labels)[name] - classification_metrics(truth, theirs, labels)[name]
        low, high = np.percentile(differences, [2.5, 97.5])
        result[name] = {"difference": round(float(point), 4), "low": round(float(low), 4),
                        "high": round(float(high), 4)}
    return result


ECE_BINS = 15
CONFIDENT = 0.9
"""The confidence a reviewer trusts a label at: its share of rows and their accuracy are reported."""


def expected_calibration_error(confidences: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> float:
    """Sum over equal-width confidence bins of |accuracy - mean confidence| x the bin's share."""
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(confidences, edges[1:-1], right=True), 0, bins - 1)
    error = 0.0
    for b in range(bins):
        mask = which == b
        if mask.any():
            error += mask.mean() * abs(correct[mask].mean() - confidences[mask].mean())
    return float(error)


def negative_log_likelihood(log_probs: torch.Tensor, truth: torch.Tensor) -> float:
    return float(-log_probs.gather(1, truth[:, None]).mean())


def confidence_report(log_probs: torch.Tensor, truth: torch.Tensor) -> dict[str, float]:
    """ECE, NLL, and the share and accuracy of rows at confidence >= ``CONFIDENT``."""
    confidence, predicted = log_probs.exp().max(-1)
    correct = (predicted == truth).numpy()
    confident = (confidence >= CONFIDENT).numpy()
    return {"ece": round(expected_calibration_error(confidence.numpy(), correct), 4),
            "nll": round(negative_log_likelihood(log_probs, truth), 4),
            "confident_share": round(float(confident.mean()), 4),
            "confident_accuracy": round(float(correct[confident].mean()), 4) if confident.any() else None}
