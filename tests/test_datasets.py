"""Loaders, rasterization and the near-duplicate audit, on the real annotation files."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest

from export.datasets import (
    CLASS_LABELS,
    AnnotatedSlice,
    Region,
    default_data_root,
    load_classification_split,
    load_via_split,
)
from gateway.preprocessing import load_image_file

DATA_ROOT = default_data_root()
needs_data = pytest.mark.skipif(
    not (DATA_ROOT / "br35h-polygons").is_dir(),
    reason=f"shared datasets not found at {DATA_ROOT} (set BRAINSCAN_DATA to run these)",
)


# --- rasterization (no data needed) ------------------------------------------


def test_polygon_rasterizes_its_interior() -> None:
    square = Region.from_via({"name": "polygon", "all_points_x": [10, 29, 29, 10], "all_points_y": [5, 5, 24, 24]})
    mask = square.rasterize(40, 50)
    assert mask.dtype == bool and mask.shape == (40, 50)
    assert mask.sum() == 20 * 20
    assert mask[5:25, 10:30].all()


def test_circle_and_rotated_ellipse_have_their_area() -> None:
    circle = Region.from_via({"name": "circle", "cx": 50, "cy": 40, "r": 12})
    assert circle.rasterize(100, 100).sum() == pytest.approx(math.pi * 12**2, rel=0.12)
    ellipse = Region.from_via({"name": "ellipse", "cx": 50, "cy": 50, "rx": 30, "ry": 10, "theta": math.pi / 2})
    mask = ellipse.rasterize(100, 100)
    assert mask.sum() == pytest.approx(math.pi * 30 * 10, rel=0.12)  # boundary pixels count as inside
    ys, xs = np.nonzero(mask)
    assert np.ptp(ys) > np.ptp(xs) * 2  # rotated by 90°: the long axis is now vertical


def test_regions_are_clipped_to_the_image() -> None:
    circle = Region.from_via({"name": "circle", "cx": 0, "cy": 0, "r": 10})
    assert 0 < circle.rasterize(20, 20).sum() < math.pi * 100 / 2


def test_unknown_shape_is_refused() -> None:
    with pytest.raises(ValueError, match="point"):
        Region.from_via({"name": "point", "cx": 1, "cy": 1})


def test_union_of_instances() -> None:
    a = Region.from_via({"name": "circle", "cx": 10, "cy": 10, "r": 5})
    b = Region.from_via({"name": "circle", "cx": 30, "cy": 30, "r": 5})
    item = AnnotatedSlice(path=Path("x.jpg"), regions=(a, b))
    instances = item.instance_masks(40, 40)
    assert len(instances) == 2
    np.testing.assert_array_equal(item.union_mask(40, 40), instances[0] | instances[1])
    assert not AnnotatedSlice(path=Path("y.jpg"), regions=()).union_mask(8, 8).any()


def test_default_data_root_honours_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("BRAINSCAN_DATA", str(tmp_path))
    assert default_data_root() == tmp_path
    monkeypatch.delenv("BRAINSCAN_DATA")
    assert default_data_root().parts[-2:] == ("shared", "datasets")


# --- real annotation files ------------------------------------------------------


@needs_data
def test_br35h_train_has_all_three_via_shapes() -> None:
    slices = load_via_split(DATA_ROOT, "br35h-polygons", "train")
    assert len(slices) == 500
    shapes = Counter(r.shape for s in slices for r in s.regions)
    assert set(shapes) == {"polygon", "circle", "ellipse"}
    assert sum(shapes.values()) == 564
    assert any(len(s.regions) >= 2 for s in slices)


@needs_data
@pytest.mark.parametrize("shape", ["polygon", "circle", "ellipse"])
def test_each_shape_rasterizes_inside_its_real_image(shape: str) -> None:
    slices = load_via_split(DATA_ROOT, "br35h-polygons", "train")
    item = next(s for s in slices if any(r.shape == shape for r in s.regions))
    gray = load_image_file(str(item.path)).pixels
    masks = item.instance_masks(*gray.shape)
    assert len(masks) == len(item.regions)
    for region, mask in zip(item.regions, masks):
        assert mask.shape == gray.shape
        assert 0.0005 < mask.mean() < 0.6, f"{item.path.name}: {region.shape} covers {mask.mean():.3%}"


@needs_data
@pytest.mark.parametrize(("dataset", "split", "count"), [("ruslan-kl-polygons", "train", 86), ("ruslan-kl-polygons", "test", 4), ("br35h-polygons", "val", 201)])
def test_every_annotated_slice_has_a_tumor(dataset: str, split: str, count: int) -> None:
    slices = load_via_split(DATA_ROOT, dataset, split)
    assert len(slices) == count
    assert all(s.regions and s.path.is_file() for s in slices)


@needs_data
def test_classification_labels_are_normalized_and_names_with_spaces_load() -> None:
    items = load_classification_split(DATA_ROOT, "Training")
    counts = Counter(label for _, label in items)
    assert counts == {"glioma": 826, "meningioma": 822, "no_tumor": 395, "pituitary": 827}
    assert set(counts) == set(CLASS_LABELS)
    spaced = [p for p, _ in items if " " in p.name and "(" in p.name]
    assert spaced, "expected file names with spaces and parentheses"
    image = load_image_file(str(spaced[0])).pixels
    assert image.ndim == 2 and 0.0 <= image.min() and image.max() <= 1.0


@needs_data
def test_unknown_via_dataset_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown VIA dataset"):
        load_via_split(DATA_ROOT, "sartaj-classification", "Training")


# --- near-duplicate audit -----------------------------------------------------------


@needs_data
def test_signature_survives_recrop_rescale_and_contrast() -> None:
    from export.audit import signature

    slices = {s.path.name: s.path for s in load_via_split(DATA_ROOT, "br35h-polygons", "train")}
    gray = load_image_file(str(slices["y10.jpg"])).pixels
    h, w = gray.shape
    padded = np.pad(gray, ((h // 5, 0), (0, w // 4)))  # re-cropped: more background
    rescaled = cv2.resize(padded, (int(w * 1.3), int(h * 1.2)), interpolation=cv2.INTER_AREA)
    changed = np.clip(rescaled**0.8 * 0.9, 0, 1).astype(np.float32)  # gamma + contrast change
    base = signature(gray)
    assert float(base @ signature(changed)) >= 0.90
    assert float(base @ signature(load_image_file(str(slices["y100.jpg"])).pixels)) < 0.90


def _signatures_in(cache: str, paths: list[Path]) -> np.ndarray:
    import os

    os.environ["BRAINSCAN_CACHE"] = cache
    from export.audit import compute_signatures

    return compute_signatures(paths, progress=False)


@needs_data
def test_runs_filling_one_signature_cache_at_once_all_finish(tmp_path: Path) -> None:
    """Trainings started together all write the cache; a shared temporary name made all but one crash
    (timing-dependent, so several rounds of four writers, each round on a fresh cache)."""
    from concurrent.futures import ProcessPoolExecutor

    paths = [s.path for s in load_via_split(DATA_ROOT, "ruslan-kl-polygons", "val")]
    caches = [tmp_path / f"round{r}" for r in range(6)]
    for cache in caches:
        cache.mkdir()
    with ProcessPoolExecutor(4) as pool:
        for cache in caches:
            results = list(pool.map(_signatures_in, [str(cache)] * 4, [paths] * 4))
            assert all(np.array_equal(r, results[0]) for r in results)
            assert [p.name for p in cache.iterdir()] == ["signatures-v1.npz"]  # no temporary file left behind
    assert np.array_equal(_signatures_in(str(caches[0]), paths), results[0])


@needs_data
def test_audit_subsets_and_training_exclusion() -> None:
    from export.audit import EVAL_SPLITS, load_or_build_audit

    audit = load_or_build_audit(DATA_ROOT)
    assert set(EVAL_SPLITS) <= set(audit.duplicate_free)
    novel = audit.duplicate_free["sartaj-classification/Testing"]
    assert 100 <= len(novel) <= 150  # README: about 130 of 394 have no near-duplicate in Training
    assert not any("/no_tumor/" in p for p in novel)  # every Testing no_tumor slice has a copy in Training
    assert 90 <= len(audit.duplicate_free["br35h-polygons/val"]) <= 140
    excluded = sorted(audit.excluded_training)
    assert excluded and all(not p.startswith(("br35h-polygons/val", "sartaj-classification/Testing")) for p in excluded)
    assert audit.is_excluded_from_training(DATA_ROOT / excluded[0])
    kept = next(p for p, _ in load_classification_split(DATA_ROOT, "Training") if not audit.is_excluded_from_training(p))
    assert kept.is_file()


def test_group_split_keeps_duplicate_groups_together() -> None:
    from export.train_common import group_split

    labels = ["a"] * 40 + ["b"] * 20
    groups = np.repeat(np.arange(30), 2)  # pairs of near-duplicates
    train, val = group_split(labels, groups, 0.25, seed=1)
    assert set(train).isdisjoint(val) and len(train) + len(val) == 60
    assert set(groups[train]).isdisjoint(groups[val])
    assert {labels[i] for i in val} == {"a", "b"}
