"""A series' U-Net masks as a DICOM Segmentation (highdicom), for filing back into PACS.

One SEG per series, one segment ("tumor"), binary, referencing every source
instance; patient and study identifiers come from the source headers (DICOM
requires them in the SEG) and are never logged. Frames without tumor pixels
are left out, as highdicom does by default; a reader gets empty masks for them.
"""

from __future__ import annotations

import copy
import io
from collections.abc import Sequence

import numpy as np

from gateway.contract import DISCLAIMER
from gateway.errors import InvalidSeries

ALGORITHM_NAME = "brainscan unet"
SERIES_DESCRIPTION = "brainscan tumor segmentation (research use only)"
SEG_SERIES_NUMBER = 9001  # a derived series; PACS shows it beside the source


def segmentation_bytes(
    headers: Sequence[object],
    masks: np.ndarray,
    *,
    unet_version: str,
    software_version: str,
    slice_distance_mm: float | None = None,
) -> bytes:
    """`headers`: the source datasets (no pixel data needed) in the order of `masks`
    (frames×rows×columns bool): one per single-frame source, or one multi-frame source for all frames.

    highdicom reads the pixel measures from the sources; one without SliceThickness
    (an optional tag in practice) is given the series' slice distance, on a copy.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    if masks.ndim != 3 or masks.dtype != np.bool_:
        raise ValueError(f"masks must be a frames×rows×columns bool array, got {masks.dtype} {masks.shape}")
    if len(headers) not in (1, masks.shape[0]):
        raise InvalidSeries("a DICOM SEG needs single-frame sources or one multi-frame source per series")
    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="tumor",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Neoplasm,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name=ALGORITHM_NAME, family=codes.cid7162.ArtificialIntelligence, version=unet_version
        ),
    )
    headers = [_with_thickness(h, slice_distance_mm) for h in headers]
    segmentation = hd.seg.Segmentation(
        source_images=list(headers),
        pixel_array=masks,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description],
        series_instance_uid=hd.UID(),
        series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="brainscan",
        manufacturer_model_name="brainscan gateway",
        software_versions=software_version,
        device_serial_number="0",
        series_description=SERIES_DESCRIPTION,
        content_description=DISCLAIMER[:64],
        content_label="TUMOR",
    )
    buffer = io.BytesIO()
    segmentation.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _with_thickness(header, slice_distance_mm: float | None):
    if header.get("SliceThickness") or "PixelSpacing" not in header:
        return header
    header = copy.deepcopy(header)
    header.SliceThickness = f"{slice_distance_mm or 1.0:g}"
    return header
