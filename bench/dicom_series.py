"""Synthetic MR series as DICOM files (pydicom), for `python -m bench series` and the tests."""

from __future__ import annotations

import io

import numpy as np
import pydicom
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid


def mr_series(
    stack: np.ndarray,
    *,
    positions_mm: list[float] | None = None,
    spacing: tuple[float, float] = (0.8, 0.8),
    orientation: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
    series_uid: str | None = None,
    study_uid: str | None = None,
    patient_name: str = "Doe^Jane",
    patient_id: str = "PAT-0001",
    geometry: bool = True,
    slice_thickness: float | None = None,
) -> list[bytes]:
    """One single-frame MR file per slice of `stack` (slices×H×W uint16), in stack order.

    Slice i lies at `positions_mm[i]` along the normal of `orientation` (default 5 mm apart),
    InstanceNumber i + 1. `geometry=False` leaves out ImagePositionPatient/ImageOrientationPatient.
    """
    series_uid = series_uid or generate_uid()
    study_uid = study_uid or generate_uid()
    frame_of_reference = generate_uid()
    positions_mm = positions_mm if positions_mm is not None else [5.0 * i for i in range(len(stack))]
    row, column = np.asarray(orientation[:3]), np.asarray(orientation[3:])
    normal = np.cross(row, column)
    files = []
    for index, (pixels, along) in enumerate(zip(stack, positions_mm)):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"  # MR Image Storage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(f"slice-{index}.dcm", {}, file_meta=meta, preamble=b"\x00" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = patient_name, patient_id, "19700101", "F"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_of_reference
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20260101", "120000", "1", "ACC-1"
        ds.ReferringPhysicianName = ""
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "MR", 3, index + 1
        ds.Manufacturer, ds.PositionReferenceIndicator = "test", ""
        ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions, ds.MRAcquisitionType = "SE", "NONE", "", "2D"
        ds.EchoTrainLength, ds.ImageType = 1, ["ORIGINAL", "PRIMARY", "AXIAL"]
        if geometry:
            ds.ImageOrientationPatient = [f"{v:g}" for v in orientation]
            ds.ImagePositionPatient = [f"{v:.4f}" for v in normal * along]
        if slice_thickness is not None:
            ds.SliceThickness = f"{slice_thickness:g}"
        ds.PixelSpacing = [f"{spacing[0]:g}", f"{spacing[1]:g}"]
        ds.Rows, ds.Columns = pixels.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = np.ascontiguousarray(pixels, dtype="<u2").tobytes()
        buffer = io.BytesIO()
        pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
        files.append(buffer.getvalue())
    return files
