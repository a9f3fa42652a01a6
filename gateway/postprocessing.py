"""Model outputs → results in the original image's pixels, masks PNG-encoded once."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from gateway.preprocessing import PreparedImage, boxes_to_original, mask_in_crop


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


def encode_region(mask: np.ndarray, left: int, top: int, right: int, bottom: int) -> MaskRegion:
    """PNG-encode mask[top:bottom, left:right] (bool)."""
    patch = (mask[top:bottom, left:right].astype(np.uint8)) * 255
    ok, encoded = cv2.imencode(".png", patch, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:  # pragma: no cover - OpenCV fails only on empty arrays, excluded by callers
        raise RuntimeError("PNG encoding of a mask failed")
    return MaskRegion(left=left, top=top, width=right - left, height=bottom - top, png=encoded.tobytes())


def area_mm2(area_px: int, spacing: tuple[float, float] | None) -> float | None:
    return None if spacing is None else float(area_px * spacing[0] * spacing[1])


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
    inside = mask_in_crop(probabilities, prepared) >= threshold
    pixels = inside.view(np.uint8)
    area = int(cv2.countNonZero(pixels))
    if area == 0:
        return None
    left, top, width, height = cv2.boundingRect(pixels)  # of the non-zero pixels; 10x faster than np.nonzero
    mask = encode_region(inside, left, top, left + width, top + height)
    x0, y0 = prepared.crop.x0, prepared.crop.y0
    return SegmentationResult(
        mask=MaskRegion(left=left + x0, top=top + y0, width=width, height=height, png=mask.png),
        area_px=area,
        bbox=(float(left + x0), float(top + y0), float(left + x0 + width), float(top + y0 + height)),
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
        region = encode_region(inside, left - crop.x0, top - crop.y0, right - crop.x0, bottom - crop.y0)
        area = int(cv2.countNonZero(inside[top - crop.y0 : bottom - crop.y0, left - crop.x0 : right - crop.x0].view(np.uint8)))
        instances.append(
            InstanceResult(
                box=tuple(float(v) for v in box),
                score=float(scores[index]),
                mask=MaskRegion(left=left, top=top, width=right - left, height=bottom - top, png=region.png),
                area_px=area,
                area_mm2=area_mm2(area, spacing),
            )
        )
    return instances
