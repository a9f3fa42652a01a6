"""COCO detection/segmentation metrics (pycocotools) for one-class tumor instances.

Ground truth and predictions are plain numpy per image, on any grid (the
model's S×S grid during training, original pixels in `evaluate`). Images
without ground truth still count: their detections are false positives.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from gateway.config import GatewayConfig
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

MASK_THRESHOLD = 0.5  # mask probability → binary mask, as torchvision's own paste step intends
# The gateway's default detection threshold: metrics "at threshold" mean "as served".
SERVING_THRESHOLD = GatewayConfig.detection_threshold


@dataclass(frozen=True)
class Prediction:
    """One image's detections: boxes N×4 (x0, y0, x1, y1), scores N, masks N×H×W probabilities or bool."""

    boxes: np.ndarray
    scores: np.ndarray
    masks: np.ndarray

    def above(self, threshold: float) -> Prediction:
        keep = self.scores >= threshold
        return Prediction(self.boxes[keep], self.scores[keep], self.masks[keep])


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def _xywh(box: Sequence[float]) -> list[float]:
    x0, y0, x1, y1 = (float(v) for v in box)
    return [x0, y0, x1 - x0, y1 - y0]


@dataclass(frozen=True)
class _ImageRecord:
    """One image's COCO entries, encoded once: (height, width), ground-truth annotations and detections
    without ids (ids are given when a set of records is evaluated, so a record can appear twice)."""

    shape: tuple[int, int]
    annotations: list[dict]
    results: list[dict]


def _records(gt_masks: Sequence[np.ndarray], predictions: Sequence[Prediction]) -> list[_ImageRecord]:
    if len(gt_masks) != len(predictions):
        raise ValueError(f"{len(gt_masks)} ground-truth images but {len(predictions)} predictions")
    records = []
    for gts, pred in zip(gt_masks, predictions):
        annotations = []
        for gt in gts:
            rle = _rle(gt)
            annotations.append({"category_id": 1, "iscrowd": 0, "segmentation": rle,
                                "area": float(mask_utils.area(rle)), "bbox": [float(v) for v in mask_utils.toBbox(rle)]})
        results = []
        for box, score, mask in zip(pred.boxes, pred.scores, pred.masks):
            binary = mask >= MASK_THRESHOLD if mask.dtype != bool else mask
            results.append({"category_id": 1, "score": float(score), "bbox": _xywh(box), "segmentation": _rle(binary)})
        records.append(_ImageRecord((int(gts.shape[-2]), int(gts.shape[-1])), annotations, results))
    return records


def _average_precision(records: Sequence[_ImageRecord], kinds: Sequence[str] = ("box", "mask")) -> dict[str, float]:
    """AP@0.5 and AP@0.5:0.95 of `kinds` ("box", "mask") over `records`."""
    images, annotations, results = [], [], []
    for image_id, record in enumerate(records, start=1):
        images.append({"id": image_id, "height": record.shape[0], "width": record.shape[1]})
        annotations += [{**a, "id": len(annotations) + k + 1, "image_id": image_id} for k, a in enumerate(record.annotations)]
        results += [{**r, "image_id": image_id} for r in record.results]
    if not annotations:
        return {f"{kind}_{name}": float("nan") for kind in kinds for name in ("ap50", "ap")}
    metrics: dict[str, float] = {}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its tables
        gt = COCO()
        gt.dataset = {"info": {}, "images": images, "annotations": annotations, "categories": [{"id": 1, "name": "tumor"}]}
        gt.createIndex()
        for prefix in kinds:
            iou_type = "bbox" if prefix == "box" else "segm"
            if results:
                # One field per result type: loadRes derives area from whichever it finds first.
                drop = "segmentation" if iou_type == "bbox" else "bbox"
                dt = gt.loadRes([{k: v for k, v in r.items() if k != drop} for r in results])
                evaluator = COCOeval(gt, dt, iou_type)
                evaluator.params.imgIds = [img["id"] for img in images]
                evaluator.evaluate()
                evaluator.accumulate()
                evaluator.summarize()
                stats = evaluator.stats
                metrics[f"{prefix}_ap"], metrics[f"{prefix}_ap50"] = float(stats[0]), float(stats[1])
            else:
                metrics[f"{prefix}_ap"], metrics[f"{prefix}_ap50"] = 0.0, 0.0
    return metrics


def coco_metrics(gt_masks: Sequence[np.ndarray], predictions: Sequence[Prediction]) -> dict[str, float]:
    """AP@0.5 and AP@0.5:0.95 for boxes and masks (GT boxes are the tight boxes of GT masks).

    `gt_masks[i]` is a K×H×W boolean stack for image i (K may be 0).
    """
    return _average_precision(_records(gt_masks, predictions))


def box_ap50_interval(gt_masks: Sequence[np.ndarray], predictions: Sequence[Prediction], groups: Sequence[str], *,
                      resamples: int = 200, level: float = 0.95, seed: int = 0) -> list[float] | None:
    """95% interval of box AP@0.5 when whole groups (patients, near-duplicate groups) are drawn with
    replacement: COCO AP is not a mean over images, so each draw re-runs the evaluation (boxes only)."""
    records = _records(gt_masks, predictions)
    if not any(r.annotations for r in records):
        return None
    members: dict[str, list[int]] = {}
    for index, group in enumerate(groups):
        members.setdefault(group, []).append(index)
    lists = list(members.values())
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(resamples):
        chosen = [i for g in rng.integers(0, len(lists), size=len(lists)) for i in lists[g]]
        value = _average_precision([records[i] for i in chosen], ("box",))["box_ap50"]
        if value == value:  # a draw without any tumor has no AP
            draws.append(value)
    tail = (1 - level) / 2 * 100
    return [round(float(np.percentile(draws, tail)), 4), round(float(np.percentile(draws, 100 - tail)), 4)]


def false_positive_rate(predictions: Sequence[Prediction], threshold: float) -> float:
    """Share of (tumor-free) images with at least one detection scoring ≥ threshold."""
    if not predictions:
        return float("nan")
    return float(np.mean([bool((p.scores >= threshold).any()) for p in predictions]))
