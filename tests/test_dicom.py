"""DICOM done right: photometric inversion, modality rescale, VOI window,
16-bit, multi-frame series, RLE compression, PixelSpacing. The DICOMs are
built at test time from real slices of ../shared/datasets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from brainscan import Client, InvalidInput
from gateway.errors import InvalidImage
from gateway.preprocessing import decode_frames, decode_image, load_image_file
from tests.dicom_factory import dicom_bytes


@pytest.fixture(scope="module")
def real_slices(data_root: Path) -> list[np.ndarray]:
    """Three real Testing slices as 12-bit uint16 (as an MR scanner would store them)."""
    folder = data_root / "sartaj-classification" / "Testing" / "glioma_tumor"
    paths = sorted(folder.iterdir())[:3]
    slices = []
    for path in paths:
        gray = load_image_file(str(path)).pixels[:200, :200]
        slices.append(np.round(gray * 4095).astype(np.uint16))
    return slices


def test_sixteen_bit_dicom_decodes_like_the_slice(real_slices):
    pixels = real_slices[0]
    decoded = decode_image(dicom_bytes(pixels, spacing=(0.5, 0.6)))
    assert decoded.source_format == "dicom" and decoded.pixel_spacing_mm == (0.5, 0.6)
    expected = (pixels - pixels.min()) / float(pixels.max() - pixels.min())
    assert np.allclose(decoded.pixels, expected, atol=1e-6)


def test_monochrome1_is_inverted(real_slices):
    pixels = real_slices[0]
    plain = decode_image(dicom_bytes(pixels)).pixels
    inverted = decode_image(dicom_bytes(pixels, photometric="MONOCHROME1")).pixels
    assert np.allclose(inverted, 1.0 - plain, atol=1e-6)


def test_rescale_then_window_as_a_viewer_shows_it(real_slices):
    pixels = real_slices[1]
    # stored value v → 2v - 1000, window 1000 ± 500 → [500, 1500] → unit scale
    decoded = decode_image(dicom_bytes(pixels, slope=2.0, intercept=-1000.0, window=(1000.0, 1000.0))).pixels
    modality = pixels.astype(np.float64) * 2.0 - 1000.0
    windowed = np.clip(modality, 500.0, 1500.0)
    expected = (windowed - windowed.min()) / (windowed.max() - windowed.min())
    assert np.allclose(decoded, expected, atol=1e-5)
    assert (decoded == 0).mean() > 0.05  # the window really clipped the dark background


def test_rle_lossless_decodes_like_uncompressed(real_slices):
    pixels = real_slices[2]
    compressed = dicom_bytes(pixels, compress_rle=True)
    assert np.array_equal(decode_image(compressed).pixels, decode_image(dicom_bytes(pixels)).pixels)


def test_unsupported_compression_is_a_clear_error(real_slices):
    jpeg_labelled = dicom_bytes(real_slices[0], transfer_syntax="1.2.840.10008.1.2.4.50")  # JPEG Baseline
    with pytest.raises(InvalidImage, match="transfer syntax"):
        decode_image(jpeg_labelled)


def test_multi_frame_dicom_gives_one_result_per_frame(embedded_gateway, real_slices):
    series = np.stack(real_slices)
    data = dicom_bytes(series, spacing=(0.7, 0.7))
    assert len(decode_frames(data)) == 3
    with Client(embedded_gateway.address) as client:
        results = list(client.analyze_many([data], gate=False))
        assert [r.frame for r in results] == [0, 1, 2]
        singles = [client.analyze(frame, gate=False) for frame in real_slices]
        with pytest.raises(InvalidInput, match="multi-frame DICOM .*AnalyzeStream"):
            client.analyze(data)
    for streamed, single in zip(results, singles):
        assert streamed.image_size == (200, 200)
        assert streamed.label == single.label
        assert streamed.probabilities == pytest.approx(single.probabilities, abs=1e-4)
