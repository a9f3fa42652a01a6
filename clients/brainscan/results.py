"""Typed, frozen results. Masks are H×W bool arrays in the ORIGINAL image's pixels."""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np

from brainscan.errors import from_status
from brainscan_proto.v1 import brainscan_pb2 as pb

DISCLAIMER = "Research use only. Not a medical device; not for diagnosis or treatment decisions."


@dataclass(frozen=True)
class Scope:
    """Whether the slice was judged. `assessed` False: "could not judge" (not "no tumor"); the result then
    reports no tumor finding and the label `not_assessed`."""

    assessed: bool
    reason: str  # "" when assessed; else blank, colour_image or ct_or_not_mri
    detail: str  # the reason in words
    in_scope_probability: float | None  # the classifier's p(brain MRI slice it can judge); None if it has none

    def to_json_dict(self) -> dict[str, object]:
        p = self.in_scope_probability
        return {"assessed": self.assessed, "reason": self.reason, "detail": self.detail,
                "in_scope_probability": None if p is None else round(p, 6)}


@dataclass(frozen=True)
class Instance:
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in original pixels
    score: float
    mask: np.ndarray = field(repr=False)    # H×W bool, original pixels
    area_px: int
    area_mm2: float | None = None


@dataclass(frozen=True)
class AnalysisResult:
    image_id: str
    label: str  # glioma, meningioma, pituitary, no_tumor, or not_assessed (scope.assessed False)
    probabilities: dict[str, float]
    tumor_probability: float
    tumor_detected: bool  # the gateway's decision from all the evidence; the label agrees with it
    scope: Scope
    mask: np.ndarray | None = field(repr=False)  # U-Net mask, H×W bool, or None
    segmentation_area_px: int
    segmentation_area_mm2: float | None
    segmentation_bbox: tuple[float, float, float, float] | None
    instances: tuple[Instance, ...]
    models: dict[str, str]
    timings: dict[str, float]  # milliseconds per stage
    image_size: tuple[int, int]  # (height, width)
    segmentation_ran: bool
    detection_ran: bool
    frame: int = 0  # frame index within a multi-frame DICOM (AnalyzeStream)

    def to_json_dict(self) -> dict[str, object]:
        """The CLI's --json line: everything but the pixel masks."""
        return {
            "image": self.image_id,
            "label": self.label,
            "probabilities": {k: round(v, 6) for k, v in sorted(self.probabilities.items())},
            "tumor_probability": round(self.tumor_probability, 6),
            "tumor_detected": self.tumor_detected,
            "scope": self.scope.to_json_dict(),
            "image_size": list(self.image_size),
            # null segmentation / empty instances mean "found nothing" only where the model ran
            "segmentation_ran": self.segmentation_ran,
            "detection_ran": self.detection_ran,
            "segmentation": None
            if self.mask is None
            else {
                "area_px": self.segmentation_area_px,
                "area_mm2": self.segmentation_area_mm2,
                "bbox": [round(v, 2) for v in self.segmentation_bbox or ()],
            },
            "instances": [
                {
                    "box": [round(v, 2) for v in inst.box],
                    "score": round(inst.score, 6),
                    "area_px": inst.area_px,
                    "area_mm2": inst.area_mm2,
                }
                for inst in self.instances
            ],
            "models": dict(self.models),
            "timings_ms": {k: round(v, 3) for k, v in self.timings.items()},
        }


def decode_mask(mask: pb.Mask, height: int, width: int) -> np.ndarray:
    """A PNG cut-out placed back into a full H×W bool canvas."""
    from PIL import Image

    canvas = np.zeros((height, width), dtype=bool)
    if not mask.png:
        return canvas
    patch = np.asarray(Image.open(io.BytesIO(mask.png))) > 127
    canvas[mask.top : mask.top + patch.shape[0], mask.left : mask.left + patch.shape[1]] = patch
    return canvas


def result_from_response(response: pb.AnalyzeResponse) -> AnalysisResult:
    if response.HasField("error"):
        raise from_status(response.error.code, response.error.message)
    height, width = response.image_height, response.image_width
    seg = response.segmentation if response.HasField("segmentation") else None
    instances = tuple(
        Instance(
            box=(inst.box.x0, inst.box.y0, inst.box.x1, inst.box.y1),
            score=inst.score,
            mask=decode_mask(inst.mask, height, width),
            area_px=inst.area_px,
            area_mm2=inst.area_mm2 if inst.HasField("area_mm2") else None,
        )
        for inst in response.instances
    )
    return AnalysisResult(
        image_id=response.image_id,
        label=response.label,
        probabilities=dict(response.probabilities),
        tumor_probability=response.tumor_probability,
        tumor_detected=response.tumor_detected,
        scope=Scope(
            assessed=response.scope.assessed,
            reason=response.scope.reason,
            detail=response.scope.detail,
            in_scope_probability=(
                response.scope.in_scope_probability if response.scope.HasField("in_scope_probability") else None
            ),
        ),
        mask=None if seg is None else decode_mask(seg.mask, height, width),
        segmentation_area_px=0 if seg is None else seg.area_px,
        segmentation_area_mm2=seg.area_mm2 if seg is not None and seg.HasField("area_mm2") else None,
        segmentation_bbox=None if seg is None else (seg.bbox.x0, seg.bbox.y0, seg.bbox.x1, seg.bbox.y1),
        instances=instances,
        models=dict(response.model_versions),
        timings=dict(response.timings_ms),
        image_size=(height, width),
        segmentation_ran=response.segmentation_ran,
        detection_ran=response.detection_ran,
        frame=response.frame,
    )
