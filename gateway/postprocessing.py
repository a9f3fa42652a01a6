"""Model outputs → results in the original image's pixels, masks PNG-encoded once."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from gateway.preprocessing import CropBox, PreparedImage, boxes_to_original, mask_in_crop


@dataclass(frozen=True)
class MaskRegion:
    """A binary mask cut to [left, left+width) × [top, top+height), as an 8-bit PNG (0/255)."""

    left: int
    top: int
    width: int
    height: int
    png: bytes


@dataclass(frozen=True)
class SegmentationResult:
    mask: MaskRegion
    area_px: int
    bbox: tuple[float, float, float, float]
    area_mm2: float | None


@dataclass(frozen=True)
class InstanceResult:
    box: tuple[float, float, float, float]
    score: float
    mask: MaskRegion
    area_px: int
    area_mm2: float | None


def encode_region(inside: np.ndarray, crop: CropBox, left: int, top: int, right: int, bottom: int) -> tuple[MaskRegion, int]:
    """PNG-encode the box [left, right) × [top, bottom) (original pixels, within `crop`) of `inside`,
    a bool mask over the brain crop; also count its set pixels."""
    patch = inside[top - crop.y0 : bottom - crop.y0, left - crop.x0 : right - crop.x0].view(np.uint8)
    ok, encoded = cv2.imencode(".png", patch * 255, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:  # pragma: no cover - OpenCV fails only on empty arrays, excluded by callers
        raise RuntimeError("PNG encoding of a mask failed")
    region = MaskRegion(left=left, top=top, width=right - left, height=bottom - top, png=encoded.tobytes())
    return region, int(cv2.countNonZero(patch))


def area_mm2(area_px: int, spacing: tuple[float, float] | None) -> float | None:
    return None if spacing is None else float(area_px * spacing[0] * spacing[1])


def drop_small_components(probabilities: np.ndarray, *, threshold: float, min_px: int) -> np.ndarray:
    """U-Net probabilities (S×S) with every region of >= `threshold` pixels (8-connected) smaller than
    `min_px` grid pixels set below the threshold (0; -1 under a threshold of 0), so that it is neither shown
    nor counted as evidence. On healthy slices
    the U-Net leaves specks on vessels and bright bone, far more often than it finds a tumor that small; the size
    is the U-Net's `min_component_px` parameter, chosen on validation by `python -m export export decision`."""
    if min_px <= 1:
        return probabilities
    binary = (probabilities >= threshold).astype(np.uint8)
    _, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
    small = stats[:, cv2.CC_STAT_AREA] < min_px
    small[0] = False  # label 0 is the background
    if not small.any():
        return probabilities
    below = np.asarray(0.0 if threshold > 0 else threshold - 1.0, dtype=probabilities.dtype)
    return np.where(small[labels], below, probabilities)


def segmentation_from_unet(
    probabilities: np.ndarray,
    prepared: PreparedImage,
    *,
    threshold: float,
    spacing: tuple[float, float] | None,
) -> SegmentationResult | None:
    """U-Net probabilities (S×S) → the tumor mask in original pixels, or None when empty.

    Worked on the brain crop only (nothing outside it can be set), then offset to original pixels.
    """
    crop = prepared.crop
    inside = mask_in_crop(probabilities, prepared) >= threshold
    # Box of the set pixels (all zero when none are set); 10x faster than np.nonzero.
    left, top, width, height = cv2.boundingRect(inside.view(np.uint8))
    if width == 0:
        return None
    left, top = left + crop.x0, top + crop.y0
    right, bottom = left + width, top + height
    mask, area = encode_region(inside, crop, left, top, right, bottom)
    return SegmentationResult(
        mask=mask,
        area_px=area,
        bbox=(float(left), float(top), float(right), float(bottom)),
        area_mm2=area_mm2(area, spacing),
    )


def instances_from_maskrcnn(
    boxes: np.ndarray,
    scores: np.ndarray,
    masks: np.ndarray,
    prepared: PreparedImage,
    *,
    grid_size: int,
    score_threshold: float,
    mask_threshold: float,
    spacing: tuple[float, float] | None,
) -> list[InstanceResult]:
    """Mask R-CNN outputs on the grid_size grid → instances in original pixels, best first."""
    keep = np.flatnonzero(scores >= score_threshold)
    keep = keep[np.argsort(-scores[keep])]
    if keep.size == 0:
        return []
    mapped = boxes_to_original(boxes[keep], prepared, grid_size)
    crop = prepared.crop
    instances = []
    for box, index in zip(mapped, keep):
        # The box lies inside the crop (the grid covers exactly the crop): work in crop pixels.
        inside = mask_in_crop(masks[index, 0], prepared) >= mask_threshold
        left, top = max(crop.x0, int(np.floor(box[0]))), max(crop.y0, int(np.floor(box[1])))
        right, bottom = min(crop.x1, int(np.ceil(box[2]))), min(crop.y1, int(np.ceil(box[3])))
        if right <= left or bottom <= top:
            continue
        mask, area = encode_region(inside, crop, left, top, right, bottom)
        instances.append(
            InstanceResult(
                box=tuple(float(v) for v in box),
                score=float(scores[index]),
                mask=mask,
                area_px=area,
                area_mm2=area_mm2(area, spacing),
            )
        )
    return instances
