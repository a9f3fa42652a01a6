"""95% intervals for the evaluation's per-slice means (sensitivity, specificity, accuracy, Dice).

Slices are not independent evidence: one patient's slices (lgg-flair) and
near-duplicates of one slice (Sartaj, Br35H) succeed or fail together. So the
interval resamples whole groups with replacement (a cluster bootstrap), which
widens it as much as the split's real number of independent cases asks for.
When every slice agrees (a proportion of 0 or 1, where a bootstrap has no
spread), it is the Wilson score interval over the number of groups.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from pathlib import Path

import numpy as np

LEVEL = 0.95
RESAMPLES = 2000


def wilson_interval(successes: int, n: int, level: float = LEVEL) -> tuple[float, float]:
    z = _z(level)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _z(level: float) -> float:
    from statistics import NormalDist

    return NormalDist().inv_cdf(0.5 + level / 2)


def mean_interval(values: Sequence[float] | np.ndarray, groups: Sequence[Hashable] | None = None, *,
                  level: float = LEVEL, resamples: int = RESAMPLES, seed: int = 0) -> list[float] | None:
    """[low, high] for the mean of `values` (booleans count as 0/1); None when there are none.
    `groups[i]` names the group of value i (default: every value its own group)."""
    data = np.asarray(values, dtype=np.float64)
    if data.size == 0:
        return None
    labels = np.arange(data.size) if groups is None else np.unique(np.asarray(groups, dtype=object).astype(str),
                                                                     return_inverse=True)[1]
    count = int(labels.max()) + 1
    sums = np.bincount(labels, weights=data, minlength=count)
    sizes = np.bincount(labels, minlength=count).astype(np.float64)
    if np.ptp(data) == 0:
        if data[0] in (0.0, 1.0):
            low, high = wilson_interval(int(data[0]) * count, count, level)
            return [round(low, 4), round(high, 4)]
        return [round(float(data[0]), 4)] * 2
    picks = np.random.default_rng(seed).integers(0, count, size=(resamples, count))
    means = sums[picks].sum(axis=1) / sizes[picks].sum(axis=1)
    tail = (1 - level) / 2 * 100
    return [round(float(np.percentile(means, tail)), 4), round(float(np.percentile(means, 100 - tail)), 4)]


def evidence_groups(paths: Sequence[Path]) -> list[str]:
    """The group of each slice: its patient for lgg-flair (the patient folder), else its near-duplicate
    group among `paths` (export.audit's signatures)."""
    from export.audit import compute_signatures, duplicate_groups

    others = [i for i, p in enumerate(paths) if "lgg-flair" not in Path(p).parts]
    names = [f"patient:{Path(p).parent.name}" for p in paths]
    if others:
        ids = duplicate_groups(compute_signatures([Path(paths[i]) for i in others], progress=False))
        for i, group in zip(others, ids):
            names[i] = f"near-duplicates:{group}"
    return names
