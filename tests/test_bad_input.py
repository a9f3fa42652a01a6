"""Bad input gets a clear status and the gateway keeps serving."""

from __future__ import annotations

import struct
import zlib

import cv2
import grpc
import numpy as np
import pytest

from brainscan import Client, InvalidInput
from brainscan_proto.v1 import brainscan_pb2 as pb
from brainscan_proto.v1 import brainscan_pb2_grpc as pb_grpc
from tests.conftest import png_bytes, start_gateway, stop_gateway, synthetic_slice
from tests.dicom_factory import dicom_bytes


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width×height, with a tiny (invalid) body: a decompression-bomb probe."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def jpeg_header_only(width: int, height: int) -> bytes:
    """A JPEG whose frame header (after an APP0 segment) claims width×height, and no scan data."""
    app0 = b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    sof0 = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, height, width, 1) + b"\x01\x11\x00"
    return b"\xff\xd8" + app0 + sof0 + b"\xff\xd9"


BAD_ENCODED = {
    "empty bytes": (b"", "empty"),
    "text bytes": (b"hello, this is not an image at all" * 10, "unrecognised image format"),
    "truncated PNG": (png_bytes(synthetic_slice(128))[:200], "truncated"),
    "truncated JPEG": (cv2.imencode(".jpg", synthetic_slice(128))[1].tobytes()[:-600], "truncated"),
    "1x1 PNG": (png_bytes(np.zeros((1, 1), np.uint8)), "at least"),
    "20000x20000 PNG": (png_header_only(20000, 20000), "at most"),
    "60000x60000 JPEG": (jpeg_header_only(60000, 60000), "at most"),
    "JPEG without a frame header": (b"\xff\xd8\xff\xe0\x00\x10" + b"\x00" * 14 + b"\xff\xda\x00\x08", "could not be decoded"),
    "DICOM without pixel data": (dicom_bytes(None), "no pixel data"),
}


@pytest.mark.parametrize("case", sorted(BAD_ENCODED))
def test_bad_bytes_get_invalid_argument_and_the_server_keeps_serving(gateway, case):
    data, message = BAD_ENCODED[case]
    with Client(gateway.address) as client:
        with pytest.raises(InvalidInput, match=message) as caught:
            client.analyze(data)
        assert caught.value.code == "INVALID_ARGUMENT"
        assert client.analyze(synthetic_slice(96)).label  # still serving
    assert gateway.alive()


@pytest.mark.parametrize(
    "raw, message",
    [
        (pb.RawPixels(data=b"\x00" * 400, shape=[10, 10], dtype="int32"), "dtype"),
        (pb.RawPixels(data=b"\x00" * 500, shape=[10, 10, 5], dtype="uint8"), "shape"),
        (pb.RawPixels(data=b"\x00" * 10, shape=[64, 64], dtype="uint8"), "needs 4096"),
        (pb.RawPixels(data=b"\x00" * 64, shape=[64], dtype="uint8"), "shape"),
        (pb.RawPixels(data=np.full((64, 64), np.nan, np.float32).tobytes(), shape=[64, 64], dtype="float32"), "NaN"),
    ],
    ids=["int32 dtype", "five channels", "length mismatch", "one dimension", "NaN pixels"],
)
def test_bad_raw_arrays_get_invalid_argument(gateway, raw, message):
    with grpc.insecure_channel(gateway.address) as channel:
        stub = pb_grpc.BrainScanStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.Analyze(pb.AnalyzeRequest(raw=raw), timeout=30)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in caught.value.details()
        with pytest.raises(grpc.RpcError) as missing:
            stub.Analyze(pb.AnalyzeRequest(), timeout=30)
        assert missing.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "no image" in missing.value.details()


def test_sdk_refuses_unsupported_arrays_before_sending(gateway):
    with Client(gateway.address) as client:
        with pytest.raises(InvalidInput, match="dtype"):
            client.analyze(np.zeros((64, 64), dtype=np.int32))
        with pytest.raises(InvalidInput, match="shape"):
            client.analyze(np.zeros((4, 64, 64, 2), dtype=np.uint8))
        with pytest.raises(InvalidInput, match="no such image file"):
            client.analyze("/nonexistent/slice.png")


def test_oversized_request_is_refused_with_a_clear_status(gateway):
    huge = np.random.default_rng(0).integers(0, 255, size=40 * 1024 * 1024, dtype=np.uint8).tobytes()
    with Client(gateway.address) as client:
        with pytest.raises(InvalidInput, match="too big for the gateway.*larger than max") as caught:
            client.analyze(huge)  # gRPC's size limit: retrying cannot help, so not Overloaded
        assert caught.value.code == "RESOURCE_EXHAUSTED"
        assert client.analyze(synthetic_slice(96)).label
    assert gateway.alive()


@pytest.fixture(scope="module")
def permissive_gateway(tiny_repository, tmp_path_factory):
    """Mask threshold 0: every pixel of the brain crop is tumor, so areas are known exactly whatever the random
    weights say (nothing outside the crop, which the models never see)."""
    gateway = start_gateway(
        tiny_repository, tmp_path_factory.mktemp("logs"), env={"BRAINSCAN_MASK_THRESHOLD": "0"}
    )
    yield gateway
    stop_gateway(gateway)


def test_a_mask_region_under_the_unets_minimum_is_not_shown(tiny_repository, permissive_gateway, tmp_path):
    """Mask threshold 0 makes the U-Net's whole grid one region; a minimum one pixel larger drops it."""
    from gateway.contract import load_model_spec

    grid = load_model_spec(tiny_repository / "unet").input_size
    strict = start_gateway(tiny_repository, tmp_path, env={
        "BRAINSCAN_MASK_THRESHOLD": "0", "BRAINSCAN_UNET_MIN_COMPONENT_PX": str(grid * grid + 1)})
    try:
        with Client(strict.address) as client:
            info = client.model_info()
            dropped = client.analyze(synthetic_slice(128), gate=False, detect=False)
        with Client(permissive_gateway.address) as client:
            shown = client.analyze(synthetic_slice(128), gate=False, detect=False)
            assert client.model_info().unet_min_component_px == 0  # the tiny U-Net's config has no minimum
    finally:
        stop_gateway(strict)
    assert info.unet_min_component_px == grid * grid + 1
    assert dropped.segmentation_ran and dropped.mask is None and dropped.segmentation_area_px == 0
    assert shown.mask is not None and shown.segmentation_area_px > 0


def test_dicom_with_pixel_spacing_reports_areas_in_mm2(permissive_gateway):
    pixels = synthetic_slice(128).astype(np.uint16) * 16
    with Client(permissive_gateway.address) as client:
        result = client.analyze(dicom_bytes(pixels[:, :100], spacing=(0.5, 0.8)), gate=False, detect=False)
        plain = client.analyze(pixels[:, :100], gate=False, detect=False)
    assert result.image_size == (128, 100)
    assert result.mask is not None
    x0, y0, x1, y1 = (int(v) for v in result.segmentation_bbox)
    area = (x1 - x0) * (y1 - y0)
    assert result.mask[y0:y1, x0:x1].all() and int(result.mask.sum()) == result.segmentation_area_px == area
    assert area >= 0.5 * 128 * 100  # the head fills most of the frame
    assert result.segmentation_area_mm2 == pytest.approx(area * 0.5 * 0.8, rel=1e-6)
    assert plain.segmentation_area_mm2 is None  # no spacing without DICOM
