"""End to end: SDK → real gateway process → backend → tiny real ONNX models.

Parametrized over both backends (embedded ONNX Runtime, real tritonserver).
The tiny models are random: these tests check plumbing and contracts, never
answer quality.
"""

from __future__ import annotations

import asyncio
import io

import numpy as np
import pytest
from PIL import Image

from brainscan import AnalysisResult, AsyncClient, Client, InvalidInput
from tests.conftest import png_bytes, synthetic_slice

LABELS = {"glioma", "meningioma", "no_tumor", "pituitary"}


def check_result(result: AnalysisResult, height: int, width: int) -> None:
    assert set(result.probabilities) == LABELS
    assert sum(result.probabilities.values()) == pytest.approx(1.0, abs=1e-4)
    assert result.tumor_probability == pytest.approx(1.0 - result.probabilities["no_tumor"], abs=1e-5)
    # the label agrees with the decision: a tumor class exactly when tumor_detected, not_assessed out of scope
    if result.scope.assessed:
        assert result.label in LABELS and (result.label != "no_tumor") == result.tumor_detected
    else:
        assert result.label == "not_assessed" and not result.tumor_detected and result.scope.reason
    assert result.image_size == (height, width)
    assert set(result.models) == {"classifier", "unet", "maskrcnn"}
    assert {"decode", "preprocess", "classifier", "total"} <= set(result.timings)
    if result.mask is not None:
        assert result.mask.shape == (height, width) and result.mask.dtype == bool
        assert result.segmentation_area_px == int(result.mask.sum()) > 0
        x0, y0, x1, y1 = result.segmentation_bbox
        ys, xs = np.nonzero(result.mask)
        assert (x0, y0, x1, y1) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    for instance in result.instances:
        assert instance.mask.shape == (height, width)
        x0, y0, x1, y1 = instance.box
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
        assert instance.area_px == int(instance.mask.sum())


def test_analyze_path_returns_a_typed_result(gateway, tmp_path):
    image = synthetic_slice(240)
    path = tmp_path / "slice one.png"
    path.write_bytes(png_bytes(image))
    with Client(gateway.address) as client:
        result = client.analyze(path, gate=False)
    check_result(result, 240, 240)
    assert result.image_id == str(path)
    assert result.segmentation_ran and result.detection_ran


def test_every_input_kind_gives_the_same_answer(gateway):
    gray = synthetic_slice(200, seed=3)
    rgb = np.stack([gray] * 3, axis=-1)
    ok_jpeg = io.BytesIO()
    Image.fromarray(gray).save(ok_jpeg, format="JPEG", quality=98)
    inputs = {
        "png bytes": png_bytes(gray),
        "uint8 array": gray,
        "rgb array": rgb,
        "uint16 array": gray.astype(np.uint16) * 257,
        "float32 array": gray.astype(np.float32) / 255.0,
        "PIL image": Image.fromarray(gray),
        "16-bit PNG": png_bytes(gray.astype(np.uint16) * 257),
    }
    with Client(gateway.address) as client:
        results = {name: client.analyze(value, gate=False) for name, value in inputs.items()}
        jpeg = client.analyze(ok_jpeg.getvalue(), gate=False)
    reference = results["png bytes"]
    for name, result in results.items():
        check_result(result, 200, 200)
        for label in LABELS:
            assert result.probabilities[label] == pytest.approx(reference.probabilities[label], abs=1e-4), name
        if reference.mask is not None:
            assert result.mask is not None and np.array_equal(result.mask, reference.mask), name
    check_result(jpeg, 200, 200)


def test_switches_skip_models(gateway):
    image = synthetic_slice(128)
    with Client(gateway.address) as client:
        only_classifier = client.analyze(image, segment=False, detect=False, gate=False)
        only_unet = client.analyze(image, detect=False, gate=False)
    assert not only_classifier.segmentation_ran and not only_classifier.detection_ran
    assert only_classifier.mask is None and only_classifier.instances == ()
    assert "unet" not in only_classifier.timings and "maskrcnn" not in only_classifier.timings
    assert only_unet.segmentation_ran and not only_unet.detection_ran
    assert "unet" in only_unet.timings and "maskrcnn" not in only_unet.timings


def test_gate_follows_the_classifier(gateway):
    image = synthetic_slice(128, seed=5)
    with Client(gateway.address) as client:
        gate = client.model_info().decision.gate
        result = client.analyze(image)
        ungated = client.analyze(image, gate=False)
    # With the gate on, downstream models run exactly on a judged slice with p(tumor) >= the gate,
    # and show something only with a tumor finding.
    reaches_gate = result.scope.assessed and result.tumor_probability >= gate
    assert result.segmentation_ran == reaches_gate and result.detection_ran == reaches_gate
    if not result.tumor_detected:
        assert result.mask is None and result.instances == ()
    # Ungated, all three models run at once; the decision is the same as the classifier-first order's.
    assert ungated.segmentation_ran and ungated.detection_ran
    assert ungated.probabilities == pytest.approx(result.probabilities, abs=1e-6)
    assert (ungated.label, ungated.tumor_detected) == (result.label, result.tumor_detected)
    assert (ungated.scope.assessed, ungated.scope.reason) == (result.scope.assessed, result.scope.reason)
    if result.tumor_detected:
        assert (ungated.mask is None) == (result.mask is None)
        if result.mask is not None:
            assert np.array_equal(ungated.mask, result.mask)
        assert [v for i in ungated.instances for v in i.box] == pytest.approx([v for i in result.instances for v in i.box])


def test_analyze_many_streams_in_order_and_reports_a_bad_slice_in_place(gateway):
    images = [synthetic_slice(96, seed=i) for i in range(3)]
    with Client(gateway.address) as client:
        results = list(client.analyze_many(images, gate=False))
        assert len(results) == 3
        for result in results:
            check_result(result, 96, 96)
        stream = client.analyze_many([images[0], b"not an image", images[1]])
        check_result(next(stream), 96, 96)
        with pytest.raises(InvalidInput, match="unrecognised image format"):
            next(stream)


def test_async_client_mirrors_the_blocking_one(gateway):
    image = synthetic_slice(160, seed=9)

    async def run() -> tuple[AnalysisResult, list[AnalysisResult]]:
        async with AsyncClient(gateway.address) as client:
            single = await client.analyze(image, gate=False)
            many = [r async for r in client.analyze_many([image, image], gate=False)]
            info = await client.model_info()
            assert {m.role for m in info.models} == {"classifier", "unet", "maskrcnn"}
            return single, many

    single, many = asyncio.run(run())
    with Client(gateway.address) as client:
        blocking = client.analyze(image, gate=False)
    assert single.probabilities == pytest.approx(blocking.probabilities, abs=1e-5)
    assert [r.label for r in many] == [blocking.label] * 2


def test_model_info(gateway):
    with Client(gateway.address) as client:
        info = client.model_info()
    assert info.backend == gateway.backend
    roles = {m.role: m for m in info.models}
    assert set(roles) == {"classifier", "unet", "maskrcnn"}
    assert set(roles["classifier"].labels) == LABELS
    assert all(m.input_size > 0 and m.version for m in info.models)
    assert "not a medical device" in info.disclaimer.lower()
