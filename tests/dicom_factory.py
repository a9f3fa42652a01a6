"""Builds DICOM files at test time with pydicom (never committed)."""

from __future__ import annotations

import io

import numpy as np
import pydicom
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid


def dicom_bytes(
    pixels: np.ndarray | None,
    *,
    spacing: tuple[float, float] | None = None,
    photometric: str = "MONOCHROME2",
    slope: float | None = None,
    intercept: float | None = None,
    window: tuple[float, float] | None = None,
    patient_name: str | None = None,
    compress_rle: bool = False,
    transfer_syntax: str | None = None,
) -> bytes:
    """`pixels`: H×W or frames×H×W uint16 (None: a DICOM without pixel data)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"  # MR Image Storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = FileDataset("slice.dcm", {}, file_meta=meta, preamble=b"\x00" * 128)
    dataset.SOPClassUID = meta.MediaStorageSOPClassUID
    dataset.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    dataset.Modality = "MR"
    if patient_name is not None:
        dataset.PatientName = patient_name
    if pixels is not None:
        frames = pixels.shape[0] if pixels.ndim == 3 else 1
        dataset.Rows, dataset.Columns = pixels.shape[-2:]
        if frames > 1:
            dataset.NumberOfFrames = frames
        dataset.SamplesPerPixel = 1
        dataset.PhotometricInterpretation = photometric
        dataset.BitsAllocated = 16
        dataset.BitsStored = 16
        dataset.HighBit = 15
        dataset.PixelRepresentation = 0
        dataset.PixelData = np.ascontiguousarray(pixels, dtype="<u2").tobytes()
    if spacing is not None:
        dataset.PixelSpacing = [str(spacing[0]), str(spacing[1])]
    if slope is not None:
        dataset.RescaleSlope = str(slope)
    if intercept is not None:
        dataset.RescaleIntercept = str(intercept)
    if window is not None:
        dataset.WindowCenter, dataset.WindowWidth = str(window[0]), str(window[1])
    if compress_rle:
        from pydicom.uid import RLELossless

        dataset.compress(RLELossless)
    if transfer_syntax is not None:
        # Label the pixel data with a compressed syntax nothing here can decode.
        from pydicom.encaps import encapsulate

        dataset.file_meta.TransferSyntaxUID = transfer_syntax
        dataset.PixelData = encapsulate([b"\xff\xd8\xff\xe0" + bytes(dataset.PixelData[:64])])
        dataset["PixelData"].VR = "OB"
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, dataset, enforce_file_format=True)
    return buffer.getvalue()

