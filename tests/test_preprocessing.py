"""Preprocessing and mask mapping: the numbers train and serve share."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gateway.errors import InvalidImage
from gateway.postprocessing import drop_small_components, instances_from_maskrcnn, segmentation_from_unet
from gateway.preprocessing import (
    CropBox,
    boxes_to_original,
    decode_image,
    find_brain_box,
    mask_to_original,
    prepare,
    to_unit_gray,
)
from tests.conftest import png_bytes, synthetic_slice


def test_brain_box_hugs_the_head():
    image = np.zeros((300, 400), np.float32)
    image[50:250, 100:330] = 0.6
    box = find_brain_box(image)
    # the head's extent plus a 2% margin (5 px here) and a pixel or two of blur
    assert 92 <= box.x0 <= 96 and 334 <= box.x1 <= 338
    assert 43 <= box.y0 <= 47 and 253 <= box.y1 <= 257


def test_blank_image_falls_back_to_the_whole_frame():
    assert find_brain_box(np.zeros((64, 80), np.float32)) == CropBox(0, 0, 80, 64)


def test_prepare_gives_a_normalized_square():
    prepared = prepare(to_unit_gray(synthetic_slice(200)), 96)
    assert prepared.tensor.shape == (96, 96) and prepared.tensor.dtype == np.float32
    assert prepared.tensor.min() == 0.0 and prepared.tensor.max() == 1.0


@pytest.mark.parametrize("shape", [(96, 96), (160, 160), (7, 5), (1, 1)])
def test_normalize_stretches_between_the_same_percentiles_as_numpy(shape):
    from gateway.preprocessing import _NORMALIZE_PERCENTILES, normalize

    patch = np.random.default_rng(sum(shape)).gamma(2.0, 0.1, shape).astype(np.float32)
    lo, hi = np.percentile(patch, _NORMALIZE_PERCENTILES)
    expected = np.zeros(shape, np.float32) if hi - lo < 1e-6 else np.clip((patch - lo) / (hi - lo), 0, 1)
    out = normalize(patch)
    assert out.dtype == np.float32 and out.shape == shape
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-6)


def test_masks_and_boxes_map_back_to_original_pixels():
    gray = np.zeros((300, 400), np.float32)
    gray[50:250, 100:300] = 0.6  # the crop is then 200×200 (plus margin)
    prepared = prepare(gray, 100)
    crop = prepared.crop
    grid_mask = np.zeros((100, 100), np.float32)
    grid_mask[25:75, 25:75] = 1.0  # the middle half of the crop
    full = mask_to_original(grid_mask, prepared) >= 0.5
    ys, xs = np.nonzero(full)
    assert abs(xs.min() - (crop.x0 + crop.width / 4)) <= 2 and abs(xs.max() + 1 - (crop.x0 + 3 * crop.width / 4)) <= 2
    box = boxes_to_original(np.array([[25, 25, 75, 75]], np.float32), prepared, 100)[0]
    assert box == pytest.approx([crop.x0 + crop.width / 4, crop.y0 + crop.height / 4,
                                 crop.x0 + 3 * crop.width / 4, crop.y0 + 3 * crop.height / 4], abs=1e-3)


def test_postprocessing_encodes_cut_out_masks_with_areas():
    gray = np.zeros((120, 160), np.float32)
    gray[10:110, 30:130] = 0.6
    prepared = prepare(gray, 50)
    probabilities = np.zeros((50, 50), np.float32)
    probabilities[10:20, 10:30] = 0.9
    seg = segmentation_from_unet(probabilities, prepared, threshold=0.5, spacing=(0.5, 0.5))
    assert seg is not None and seg.area_px > 0 and seg.area_mm2 == pytest.approx(seg.area_px * 0.25)
    assert seg.mask.width == seg.bbox[2] - seg.bbox[0]
    assert segmentation_from_unet(np.zeros((50, 50), np.float32), prepared, threshold=0.5, spacing=None) is None
    masks = np.zeros((2, 1, 50, 50), np.float32)
    masks[0, 0, 10:20, 10:30] = 1.0
    instances = instances_from_maskrcnn(
        np.array([[10, 10, 30, 20], [0, 0, 5, 5]], np.float32), np.array([0.9, 0.2], np.float32), masks, prepared,
        grid_size=50, score_threshold=0.5, mask_threshold=0.5, spacing=None,
    )
    assert len(instances) == 1 and instances[0].score == pytest.approx(0.9)
    assert instances[0].area_px == pytest.approx(seg.area_px, rel=0.1)


@pytest.mark.parametrize("scale, dtype", [(1, np.uint8), (257, np.uint16)])
def test_decode_png_of_each_depth(scale, dtype):
    image = synthetic_slice(64).astype(dtype) * scale
    decoded = decode_image(png_bytes(image))
    assert decoded.pixels.shape == (64, 64) and decoded.pixels.dtype == np.float32
    assert decoded.pixels.min() == 0.0 and decoded.pixels.max() <= 1.0


def test_unsupported_array_dtype_is_refused():
    with pytest.raises(InvalidImage, match="int32"):
        to_unit_gray(np.zeros((64, 64), np.int32))


def test_colour_decodes_to_the_rgb_luminance_of_the_array():
    import cv2

    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)
    expected = (rgb.astype(np.float64) @ [0.299, 0.587, 0.114]) / 255.0
    np.testing.assert_allclose(to_unit_gray(rgb), expected, atol=1e-5)
    ok, png = cv2.imencode(".png", rgb[:, :, ::-1])  # OpenCV writes BGR: the file holds the RGB image
    assert ok
    np.testing.assert_allclose(decode_image(png.tobytes()).pixels, expected, atol=1e-5)


def test_gray_saved_as_colour_decodes_like_its_luminance_and_one_odd_pixel_counts():
    import cv2

    rng = np.random.default_rng(4)
    gray = rng.integers(0, 256, (40, 56), dtype=np.uint8)
    colour = np.repeat(gray[:, :, None], 4, axis=2)  # B = G = R (alpha ignored)
    np.testing.assert_allclose(to_unit_gray(colour, bgr=True), gray / 255.0, atol=1e-6)
    np.testing.assert_array_equal(to_unit_gray(gray), gray.astype(np.float32) / 255.0)
    colour[7, 9, 0] = 255 - colour[7, 9, 0]  # no longer gray: the luminance formula applies
    expected = (colour[:, :, :3].astype(np.float64) @ [0.114, 0.587, 0.299]) / 255.0
    np.testing.assert_allclose(to_unit_gray(colour, bgr=True), expected, atol=1e-5)
    ok, jpeg = cv2.imencode(".jpg", np.repeat(gray[:, :, None], 3, axis=2))
    assert ok
    decoded = cv2.imdecode(jpeg, cv2.IMREAD_UNCHANGED)
    assert decoded.ndim == 3  # a colour JPEG of a gray slice, as most of the datasets' files are
    np.testing.assert_allclose(decode_image(jpeg.tobytes()).pixels, decoded[:, :, 0] / 255.0, atol=1e-6)


def test_unet_mask_bbox_and_area_match_the_mapped_pixels():
    rng = np.random.default_rng(5)
    gray = np.zeros((97, 131), np.float32)
    gray[5:90, 7:120] = 0.5
    prepared = prepare(gray, 32)
    for _ in range(20):
        probabilities = (rng.random((32, 32)) * rng.uniform(0.3, 1.2)).astype(np.float32)
        full = mask_to_original(probabilities, prepared) >= 0.5
        seg = segmentation_from_unet(probabilities, prepared, threshold=0.5, spacing=None)
        ys, xs = np.nonzero(full)
        if ys.size == 0:
            assert seg is None
            continue
        assert seg is not None and seg.area_px == ys.size
        assert seg.bbox == (xs.min(), ys.min(), xs.max() + 1.0, ys.max() + 1.0)


def test_unet_regions_under_the_minimum_are_dropped_and_the_rest_left_alone():
    probabilities = np.full((40, 40), 0.2, np.float32)
    probabilities[2:5, 2:5] = 0.9  # 9 px: a speck
    probabilities[8, 8] = probabilities[9, 9] = probabilities[10, 10] = 0.8  # 3 px touching only diagonally
    probabilities[20:30, 20:30] = np.linspace(0.5, 1.0, 100, dtype=np.float32).reshape(10, 10)  # 100 px
    probabilities[35:37, 30:35] = 0.7  # 10 px: exactly the minimum below
    kept = drop_small_components(probabilities, threshold=0.5, min_px=10)
    assert kept.dtype == probabilities.dtype
    assert not (kept[2:5, 2:5] >= 0.5).any() and not (kept[8:11, 8:11] >= 0.5).any()
    assert np.array_equal(kept[20:30, 20:30], probabilities[20:30, 20:30])
    assert np.array_equal(kept[35:37, 30:35], probabilities[35:37, 30:35])
    untouched = np.ones_like(probabilities, bool)
    untouched[2:5, 2:5] = False
    untouched[8:11, 8:11] = False
    assert np.array_equal(kept[untouched], probabilities[untouched])  # below-threshold pixels stay as they were
    # The diagonal run is one region under 8-connectivity: with a minimum of 3 it stays.
    assert (drop_small_components(probabilities, threshold=0.5, min_px=3)[8:11, 8:11] >= 0.5).sum() == 3
    assert drop_small_components(probabilities, threshold=0.5, min_px=0) is probabilities


def test_the_unets_minimum_region_comes_from_its_config_unless_overridden():
    from gateway.config import GatewayConfig
    from gateway.contract import ModelSpec
    from gateway.errors import ContractError
    from gateway.pipeline import unet_min_component_px

    def spec(parameters: dict[str, str]) -> ModelSpec:
        return ModelSpec(name="unet", version="1", max_batch_size=8, inputs=(), outputs=(), directory=Path("."),
                         parameters=parameters)

    assert unet_min_component_px(spec({}), GatewayConfig()) == 0
    assert unet_min_component_px(spec({"min_component_px": "50"}), GatewayConfig()) == 50
    assert unet_min_component_px(spec({"min_component_px": "50"}), GatewayConfig(unet_min_component_px=0)) == 0
    with pytest.raises(ContractError, match="min_component_px='many' is not an integer"):
        unet_min_component_px(spec({"min_component_px": "many"}), GatewayConfig())
    with pytest.raises(ContractError, match="negative"):
        unet_min_component_px(spec({}), GatewayConfig(unet_min_component_px=-1))


def test_header_sizes_agree_with_pillow_on_real_files():
    import io
    from pathlib import Path

    from PIL import Image

    from gateway.image_header import read_header
    from tests.conftest import DATA_ROOT as DATA

    files = sorted((DATA / "sartaj-classification" / "Testing").rglob("*.jpg"))[::20] if DATA.is_dir() else []
    files += [None]  # plus a PNG made here, so the check runs without the datasets too
    for path in files:
        data = png_bytes(synthetic_slice(70)) if path is None else Path(path).read_bytes()
        with Image.open(io.BytesIO(data)) as image:
            header = read_header(data)
            assert (header.width, header.height) == image.size



def test_preprocessing_loads_neither_grpc_nor_an_ml_framework():
    """Training imports gateway.preprocessing: it must stay pure numpy/OpenCV (checked in a fresh interpreter)."""
    import subprocess
    import sys

    forbidden = ["grpc", "google.protobuf", "onnxruntime", "tritonclient", "torch", "torchvision", "tensorflow", "keras"]
    code = (
        "import sys, gateway.preprocessing, gateway.postprocessing, gateway.scope\n"
        f"print(sorted(m for m in {forbidden!r} if m in sys.modules))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]", f"importing gateway.preprocessing loaded {loaded}"
