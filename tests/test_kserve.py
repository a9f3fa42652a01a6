"""The gateway's KServe v2 endpoint (`brainscan_pipeline`), driven by tritonclient and
by perf_analyzer against a real gateway process on the tiny repository. It is off
unless asked for: these tests start their own gateway with BRAINSCAN_KSERVE on.
"""

from __future__ import annotations

import csv
import os
import site
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tritonclient.grpc import InferenceServerClient, InferInput, InferRequestedOutput
from tritonclient.utils import InferenceServerException

from bench.perf_input import write_input_data
from brainscan import Client
from gateway.config import load_config
from gateway.kserve import MODEL_NAME, deserialize_bytes, serialize_bytes
from tests.conftest import png_bytes, start_gateway, stop_gateway, synthetic_slice

OUTPUTS = (
    "PROBABILITIES", "TUMOR_PROBABILITY", "TUMOR_DETECTED", "LABEL", "SCOPE_REASON", "MASK_PNG", "MASK_BOX", "BOXES",
    "SCORES",
)


@pytest.fixture(scope="module")
def kserve_gateway(tiny_repository, tmp_path_factory):
    gateway = start_gateway(tiny_repository, tmp_path_factory.mktemp("kserve"), env={"BRAINSCAN_KSERVE": "true"})
    yield gateway
    stop_gateway(gateway)


@pytest.fixture()
def kserve(kserve_gateway):
    client = InferenceServerClient(kserve_gateway.address)
    yield client
    client.close()


def test_off_unless_asked_for(embedded_gateway) -> None:
    client = InferenceServerClient(embedded_gateway.address)
    try:
        with pytest.raises(InferenceServerException) as error:
            client.is_server_live()
    finally:
        client.close()
    assert "UNIMPLEMENTED" in str(error.value.status())
    assert load_config(environ={}).kserve is False
    assert load_config(environ={"BRAINSCAN_KSERVE": "on"}).kserve is True
    with pytest.raises(ValueError, match="BRAINSCAN_KSERVE='maybe'"):
        load_config(environ={"BRAINSCAN_KSERVE": "maybe"})


def _infer(client: InferenceServerClient, data: bytes, **parameters):
    image = InferInput("IMAGE", [1], "BYTES")
    image.set_data_from_numpy(np.array([data], dtype=np.object_))
    return client.infer(MODEL_NAME, [image], parameters=parameters or None)


def test_health_metadata_and_config(kserve: InferenceServerClient) -> None:
    assert kserve.is_server_live() and kserve.is_server_ready()
    assert kserve.is_model_ready(MODEL_NAME)
    assert not kserve.is_model_ready("classifier")
    metadata = kserve.get_model_metadata(MODEL_NAME, as_json=True)
    assert [t["name"] for t in metadata["inputs"]] == ["IMAGE"]
    assert metadata["inputs"][0]["datatype"] == "BYTES"
    assert [t["name"] for t in metadata["outputs"]] == list(OUTPUTS)
    config = kserve.get_model_config(MODEL_NAME, as_json=True)["config"]
    labels = config["parameters"]["labels"]["string_value"].split(",")
    assert "no_tumor" in labels
    assert "Not a medical device" in config["parameters"]["disclaimer"]["string_value"]


def test_infer_matches_the_brainscan_api(kserve: InferenceServerClient, kserve_gateway) -> None:
    image = synthetic_slice(220, seed=5)
    data = png_bytes(image)
    result = _infer(kserve, data, ungated=True)
    labels = kserve.get_model_config(MODEL_NAME, as_json=True)["config"]["parameters"]["labels"]["string_value"]
    probabilities = result.as_numpy("PROBABILITIES")
    assert probabilities.shape == (4,) and probabilities.sum() == pytest.approx(1.0, abs=1e-4)
    with Client(kserve_gateway.address) as client:
        reference = client.analyze(data, gate=False)
    for label, p in zip(labels.split(","), probabilities):
        assert p == pytest.approx(reference.probabilities[label], abs=1e-5)
    assert result.as_numpy("TUMOR_PROBABILITY")[0] == pytest.approx(reference.tumor_probability, abs=1e-5)
    assert bool(result.as_numpy("TUMOR_DETECTED")[0]) == reference.tumor_detected
    assert result.as_numpy("LABEL")[0].decode() == reference.label
    assert result.as_numpy("SCOPE_REASON")[0].decode() == reference.scope.reason
    boxes, scores = result.as_numpy("BOXES"), result.as_numpy("SCORES")
    assert boxes.shape == (len(reference.instances), 4) and scores.shape == (len(reference.instances),)
    mask_png = result.as_numpy("MASK_PNG")[0]
    x0, y0, x1, y1 = result.as_numpy("MASK_BOX").tolist()
    if reference.mask is None:
        assert mask_png == b"" and (x0, y0, x1, y1) == (0, 0, 0, 0)
    else:
        import cv2

        patch = cv2.imdecode(np.frombuffer(mask_png, np.uint8), cv2.IMREAD_UNCHANGED) > 0
        assert np.array_equal(patch, reference.mask[y0:y1, x0:x1])


def test_requested_outputs_only(kserve: InferenceServerClient) -> None:
    image = InferInput("IMAGE", [1], "BYTES")
    image.set_data_from_numpy(np.array([png_bytes(synthetic_slice(128))], dtype=np.object_))
    result = kserve.infer(MODEL_NAME, [image], outputs=[InferRequestedOutput("TUMOR_PROBABILITY")])
    assert [o.name for o in result.get_response().outputs] == ["TUMOR_PROBABILITY"]


def test_bad_requests_get_clear_statuses(kserve: InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as error:
        _infer(kserve, b"not an image")
    assert "INVALID_ARGUMENT" in str(error.value.status()) and "unrecognised image format" in error.value.message()
    with pytest.raises(InferenceServerException) as error:
        kserve.get_model_metadata("resnet50")
    assert "NOT_FOUND" in str(error.value.status()) and MODEL_NAME in error.value.message()
    wrong = InferInput("IMAGE", [1], "FP32")
    wrong.set_data_from_numpy(np.zeros([1], np.float32))
    with pytest.raises(InferenceServerException) as error:
        kserve.infer(MODEL_NAME, [wrong])
    assert "INVALID_ARGUMENT" in str(error.value.status()) and "BYTES" in error.value.message()


def test_statistics_report_the_pipeline_and_the_batches(kserve: InferenceServerClient) -> None:
    _infer(kserve, png_bytes(synthetic_slice(160)), ungated=True)
    stats = {s.name: s for s in kserve.get_inference_statistics().model_stats}
    assert {MODEL_NAME, "classifier", "unet", "maskrcnn"} <= set(stats)
    assert stats[MODEL_NAME].inference_count >= 1
    assert sum(b.compute_infer.count for b in stats["classifier"].batch_stats) >= 1


def test_raw_bytes_round_trip() -> None:
    elements = [b"", b"\x89PNG", bytes(range(256))]
    assert deserialize_bytes(serialize_bytes(elements)) == elements


def _perf_analyzer() -> tuple[Path, dict[str, str]]:
    binary = Path(sys.prefix) / "bin" / "perf_analyzer"
    if not binary.is_file():
        pytest.skip(f"perf_analyzer not found at {binary} (it ships in the tritonclient 2.51 wheel)")
    libs = [Path(p) / "nvidia" / "cuda_runtime" / "lib" for p in site.getsitepackages()]
    env = {**os.environ, "LD_LIBRARY_PATH": os.pathsep.join([str(p) for p in libs if p.is_dir()]
                                                            + [os.environ.get("LD_LIBRARY_PATH", "")])}
    probe = subprocess.run([str(binary), "--version"], capture_output=True, text=True, env=env, timeout=30)
    if probe.returncode != 0:
        pytest.skip(
            "perf_analyzer does not run here (needs `apt-get install -y libb64-0d` and "
            f"nvidia-cuda-runtime-cu12): {(probe.stderr or probe.stdout).strip()[:300]}"
        )
    return binary, env


def test_perf_analyzer_load_tests_the_whole_pipeline(kserve_gateway, tmp_path: Path) -> None:
    binary, env = _perf_analyzer()
    images = []
    for i in range(3):
        path = tmp_path / f"slice-{i}.png"
        path.write_bytes(png_bytes(synthetic_slice(200, seed=i)))
        images.append(path)
    input_data = write_input_data(images, tmp_path / "input.json")
    report = tmp_path / "perf.csv"
    command = [
        str(binary), "-m", MODEL_NAME, "-u", kserve_gateway.address, "-i", "grpc",
        "--input-data", str(input_data), "--concurrency-range", "1:2",
        "--measurement-mode", "count_windows", "--measurement-request-count", "5",
        "--max-trials", "3", "--stability-percentage", "1000",
        "--request-parameter", "ungated:true:bool", "-f", str(report),
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    rows = list(csv.DictReader(report.open()))
    assert sorted(int(r["Concurrency"]) for r in rows) == [1, 2]
    assert all(float(r["Inferences/Second"]) > 0 for r in rows)
