"""Probability calibration of the classifier: temperature scaling and expected calibration error.

The temperature is fitted on the classifier's validation split (carved from
training sources by near-duplicate group or patient; `train_classifier`),
never on an evaluation split, and folded into the exported model (its
`temperature` layer divides the logits). Softmax is shift-invariant, so the
log of the uncalibrated probabilities serves as the logits.
"""

from __future__ import annotations

import numpy as np

ECE_BINS = 15


def softmax_with_temperature(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    logits = np.log(np.clip(probabilities, 1e-12, 1.0)) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    e = np.exp(logits)
    return e / e.sum(axis=1, keepdims=True)


def partial_nll(probabilities: np.ndarray, allowed: np.ndarray) -> float:
    """Mean -log P(true label in the allowed set) (the plain NLL for one-hot rows)."""
    return float(-np.log(np.clip((probabilities * allowed).sum(axis=1), 1e-12, 1.0)).mean())


def fit_temperature(probabilities: np.ndarray, allowed: np.ndarray) -> float:
    """The temperature in [0.05, 20] minimizing the validation NLL (log-spaced grid, then a finer one)."""
    if len(probabilities) == 0:
        return 1.0
    grid = np.exp(np.linspace(np.log(0.05), np.log(20.0), 121))
    for _ in range(2):
        losses = [partial_nll(softmax_with_temperature(probabilities, t), allowed) for t in grid]
        best = int(np.argmin(losses))
        low, high = grid[max(0, best - 1)], grid[min(len(grid) - 1, best + 1)]
        grid = np.exp(np.linspace(np.log(low), np.log(high), 41))
    return float(grid[int(np.argmin([partial_nll(softmax_with_temperature(probabilities, t), allowed) for t in grid]))])


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> float | None:
    """Sum over equal-width confidence bins of |accuracy - mean confidence| × bin share."""
    if len(confidence) == 0:
        return None
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    total = 0.0
    for b in range(bins):
        rows = index == b
        if rows.any():
            total += rows.mean() * abs(float(correct[rows].mean()) - float(confidence[rows].mean()))
    return round(total, 4)


def calibration_errors(probabilities: np.ndarray, truth: np.ndarray, no_tumor: int) -> dict[str, float | None]:
    """ECE of the top label (rows with a known class, truth >= 0) and of p(tumor) as a binary forecast.

    truth: class index, or -1 for "a tumor of unknown type" (counts only for the binary ECE).
    """
    known = truth >= 0
    top = probabilities[known].argmax(axis=1)
    tumor_p = 1.0 - probabilities[:, no_tumor]
    tumor_true = truth != no_tumor
    # Binary forecast: confidence is p of the predicted side, correct when that side is true.
    predicted_tumor = tumor_p >= 0.5
    return {
        "ece_top_label": expected_calibration_error(probabilities[known].max(axis=1), top == truth[known]),
        "ece_tumor": expected_calibration_error(np.where(predicted_tumor, tumor_p, 1.0 - tumor_p), predicted_tumor == tumor_true),
    }
