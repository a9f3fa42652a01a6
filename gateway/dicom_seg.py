"""A series' U-Net masks as a DICOM Segmentation (highdicom), and its measurements as a
DICOM SR (TID 1500), for filing back into PACS.

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


def measurement_report_bytes(
    seg_bytes: bytes,
    headers: Sequence[object],
    *,
    volume_ml: float | None,
    largest_cross_section_mm2: float | None,
    unet_version: str,
    software_version: str,
) -> bytes:
    """A Comprehensive 3D SR (TID 1500 measurement report) with the tumor volume and largest
    cross-section, measured on the segment of the SEG `seg_bytes`; `headers` are its sources (evidence)."""
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    seg = pydicom.dcmread(io.BytesIO(seg_bytes))
    millilitre = hd.sr.CodedConcept(value="ml", scheme_designator="UCUM", meaning="milliliter")
    square_mm = hd.sr.CodedConcept(value="mm2", scheme_designator="UCUM", meaning="square millimeter")
    mr_brain = hd.sr.CodedConcept(value="24590-2", scheme_designator="LN", meaning="MR Brain")
    algorithm = hd.sr.AlgorithmIdentification(name=ALGORITHM_NAME, version=unet_version)
    measurements = []
    if volume_ml is not None:
        measurements.append(hd.sr.Measurement(
            name=codes.SCT.Volume, value=volume_ml, unit=millilitre, algorithm_id=algorithm
        ))
    if largest_cross_section_mm2 is not None:
        measurements.append(hd.sr.Measurement(
            name=codes.SCT.Area, value=largest_cross_section_mm2, unit=square_mm, algorithm_id=algorithm,
            qualifier=codes.SCT.Maximum,
        ))
    group = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier="tumor"),
        # Built by hand: ReferencedSegment.from_segmentation (0.28.2) misses the segment
        # identification that highdicom itself puts in the shared functional groups.
        referenced_segment=hd.sr.ReferencedSegment(
            sop_class_uid=seg.SOPClassUID,
            sop_instance_uid=seg.SOPInstanceUID,
            segment_number=1,
            source_images=[
                hd.sr.SourceImageForSegmentation(h.SOPClassUID, h.SOPInstanceUID) for h in headers
            ],
        ),
        finding_type=codes.SCT.Neoplasm,
        algorithm_id=algorithm,
        measurements=measurements,
    )
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=hd.UID(), name="brainscan", manufacturer_name="brainscan", model_name="brainscan gateway"
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=mr_brain,
        imaging_measurements=[group],
    )
    document = hd.sr.Comprehensive3DSR(
        evidence=[seg, *headers],
        content=report[0],
        series_instance_uid=hd.UID(),
        series_number=SEG_SERIES_NUMBER + 1,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="brainscan",
        series_description="brainscan tumor measurements (research use only)",
        software_versions=software_version,
    )
    buffer = io.BytesIO()
    document.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
