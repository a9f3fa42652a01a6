"""The evaluation's 95% intervals: groups of dependent slices widen them; agreement falls back to Wilson."""

from __future__ import annotations

import numpy as np
import pytest

from export.datasets import default_data_root, load_lgg_split, load_via_split
from export.intervals import evidence_groups, mean_interval, wilson_interval

DATA_ROOT = default_data_root()


def test_wilson_interval_matches_the_textbook_values() -> None:
    low, high = wilson_interval(10, 10)
    assert low == pytest.approx(0.7225, abs=1e-4) and high == 1.0
    low, high = wilson_interval(5, 10)
    assert low == pytest.approx(0.2366, abs=1e-4) and high == pytest.approx(0.7634, abs=1e-4)


def test_a_patient_counted_once_per_slice_does_not_narrow_the_interval() -> None:
    """Ten patients, 30 slices each, every patient all found or all missed: 300 slices carry the evidence
    of ten cases, so the grouped interval must be as wide as ten independent cases', not 300's."""
    found = np.repeat([1, 1, 1, 1, 1, 1, 1, 0, 0, 0], 30).astype(bool)
    patients = np.repeat(np.arange(10), 30)
    slices = mean_interval(found)
    grouped = mean_interval(found, patients)
    cases = mean_interval(found[::30])
    assert slices is not None and grouped is not None and cases is not None
    assert slices[1] - slices[0] < 0.15
    assert grouped[1] - grouped[0] > 0.45
    assert grouped == pytest.approx(cases, abs=0.05)
    assert grouped[0] <= 0.7 <= grouped[1]


def test_agreement_everywhere_gives_wilson_over_groups_and_nothing_gives_none() -> None:
    assert mean_interval(np.ones(300, bool), np.repeat(np.arange(10), 30)) == [0.7225, 1.0]
    assert mean_interval(np.zeros(3)) == [0.0, 0.5615]
    assert mean_interval([]) is None
    assert mean_interval([0.8, 0.8]) == [0.8, 0.8]  # a constant that is not a proportion: no spread to show


@pytest.mark.skipif(not (DATA_ROOT / "lgg-flair").is_dir(), reason=f"shared datasets not found at {DATA_ROOT}")
def test_slices_are_grouped_by_patient_and_by_near_duplicate() -> None:
    lgg = load_lgg_split(DATA_ROOT, "val")[:40]
    br35h = [s.path for s in load_via_split(DATA_ROOT, "br35h-polygons", "val")[:5]]
    paths = [s.path for s in lgg] + br35h + [br35h[0]]  # a slice twice: its own near-duplicate
    groups = evidence_groups(paths)
    assert groups[: len(lgg)] == [f"patient:{s.patient}" for s in lgg]
    assert groups[-1] == groups[len(lgg)]
    assert len(set(groups[len(lgg): -1])) == 5
