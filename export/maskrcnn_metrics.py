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


def coco_metrics(gt_masks: Sequence[np.ndarray], predictions: Sequence[Prediction]) -> dict[str, float]:
    """AP@0.5 and AP@0.5:0.95 for boxes and masks (GT boxes are the tight boxes of GT masks).

    `gt_masks[i]` is a K×H×W boolean stack for image i (K may be 0).
    """
    if len(gt_masks) != len(predictions):
        raise ValueError(f"{len(gt_masks)} ground-truth images but {len(predictions)} predictions")
    images, annotations, results = [], [], []
    for image_id, (gts, pred) in enumerate(zip(gt_masks, predictions), start=1):
        height, width = gts.shape[-2:]
        images.append({"id": image_id, "height": int(height), "width": int(width)})
        for gt in gts:
            rle = _rle(gt)
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": 1, "iscrowd": 0,
                "segmentation": rle, "area": float(mask_utils.area(rle)), "bbox": [float(v) for v in mask_utils.toBbox(rle)],
            })
        for box, score, mask in zip(pred.boxes, pred.scores, pred.masks):
            binary = mask >= MASK_THRESHOLD if mask.dtype != bool else mask
            results.append({
                "image_id": image_id, "category_id": 1, "score": float(score),
                "bbox": _xywh(box), "segmentation": _rle(binary),
            })
    metrics: dict[str, float] = {}
    if not annotations:
        return {f"{kind}_{name}": float("nan") for kind in ("box", "mask") for name in ("ap50", "ap")}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its tables
        gt = COCO()
        gt.dataset = {"info": {}, "images": images, "annotations": annotations, "categories": [{"id": 1, "name": "tumor"}]}
        gt.createIndex()
        for iou_type, prefix in (("bbox", "box"), ("segm", "mask")):
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


def false_positive_rate(predictions: Sequence[Prediction], threshold: float) -> float:
    """Share of (tumor-free) images with at least one detection scoring ≥ threshold."""
    if not predictions:
        return float("nan")
    return float(np.mean([bool((p.scores >= threshold).any()) for p in predictions]))
