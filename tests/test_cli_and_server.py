"""The CLI, health, reflection and start-up contract checks, against real processes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import grpc
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image

from tests.conftest import PROJECT_ROOT, health_status, png_bytes, synthetic_slice


def brainscan(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """The SDK's `brainscan` command."""
    return subprocess.run(
        [sys.executable, "-m", "brainscan.cli", *args], capture_output=True, text=True, timeout=timeout, cwd=PROJECT_ROOT
    )


def brainscan_server(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`brainscan-server` (python -m gateway)."""
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args], capture_output=True, text=True, timeout=timeout, cwd=PROJECT_ROOT
    )


def test_health_is_serving_for_the_service_and_overall(embedded_gateway):
    assert health_status(embedded_gateway.address) == health_pb2.HealthCheckResponse.SERVING
    assert health_status(embedded_gateway.address, "brainscan.v1.BrainScan") == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_services(embedded_gateway):
    with grpc.insecure_channel(embedded_gateway.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name for reply in replies for s in reply.list_services_response.service}
    assert {"brainscan.v1.BrainScan", "grpc.health.v1.Health"} <= names


def test_cli_analyze_json_and_overlay(embedded_gateway, tmp_path):
    paths = []
    for index in range(2):  # the same file name in two folders: two overlays, neither overwritten
        path = tmp_path / f"series {index}" / "slice (1).png"
        path.parent.mkdir()
        path.write_bytes(png_bytes(synthetic_slice(180, seed=index)))
        paths.append(str(path))
    out = tmp_path / "overlays"
    done = brainscan("analyze", *paths, "--server", embedded_gateway.address, "--json", "--ungated", "--overlay", str(out))
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [line["image"] for line in lines] == paths
    for line in lines:
        assert set(line) >= {"image", "label", "probabilities", "tumor_probability", "segmentation", "instances", "models", "timings_ms"}
        assert line["segmentation_ran"] is True and line["detection_ran"] is True  # --ungated: both always run
        assert line["image_size"] == [180, 180] and isinstance(line["tumor_detected"], bool)
        assert set(line["scope"]) == {"assessed", "reason", "detail", "in_scope_probability"}
        for instance in line["instances"]:
            assert set(instance) >= {"box", "score", "area_px"} and len(instance["box"]) == 4
    overlays = sorted(out.glob("*.png"))
    assert [o.name for o in overlays] == ["slice (1)-2.overlay.png", "slice (1).overlay.png"]
    assert Image.open(overlays[0]).size == (180, 180) and Image.open(overlays[0]).mode == "RGB"


def test_cli_analyze_table_and_bad_file(embedded_gateway, tmp_path):
    good = tmp_path / "good.png"
    good.write_bytes(png_bytes(synthetic_slice(128)))
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"garbage")
    done = brainscan("analyze", str(good), str(bad), "--server", embedded_gateway.address, "--no-detect")
    assert done.returncode == 1
    assert "label:" in done.stdout and "p(tumor)" in done.stdout
    assert "instances: not run" in done.stdout  # --no-detect: "not run", never "none"
    assert "bad.png" in done.stderr and "INVALID_ARGUMENT" in done.stderr


def test_cli_analyze_goes_on_after_a_file_too_big_for_the_gateway(embedded_gateway, tmp_path):
    big = tmp_path / "big.png"
    big.write_bytes(png_bytes(synthetic_slice(64)) + bytes(33 * 2**20))  # over the gateway's 32 MiB message limit
    good = tmp_path / "good.png"
    good.write_bytes(png_bytes(synthetic_slice(128)))
    done = brainscan("analyze", str(big), str(good), "--server", embedded_gateway.address)
    assert done.returncode == 1
    assert "big.png" in done.stderr and "too big" in done.stderr
    assert "good.png" in done.stdout and "label:" in done.stdout
    assert embedded_gateway.alive()


def test_cli_analyze_reports_an_unreachable_server(tmp_path):
    good = tmp_path / "good.png"
    good.write_bytes(png_bytes(synthetic_slice(64)))
    done = brainscan("analyze", str(good), "--server", "127.0.0.1:1", "--timeout", "3")
    assert done.returncode == 1
    assert "UNAVAILABLE" in done.stderr


def test_help_says_research_use_only():
    for done in (brainscan("--help"), brainscan_server("--help")):
        assert done.returncode == 0
        assert "Not a medical device" in done.stdout


def test_gateway_refuses_to_start_on_a_contract_mismatch(tiny_repository, tmp_path):
    broken = tmp_path / "repo"
    shutil.copytree(tiny_repository, broken)
    config = broken / "unet" / "config.pbtxt"
    config.write_text(config.read_text().replace('name: "mask"', 'name: "segmentation"'))
    done = brainscan_server("--port", "0", "--model-repository", str(broken), timeout=120)
    assert done.returncode == 1
    assert "expected output 'mask'" in done.stderr


def test_gateway_refuses_an_onnx_file_that_disagrees_with_its_config(tiny_repository, tmp_path):
    broken = tmp_path / "repo"
    shutil.copytree(tiny_repository, broken)
    shutil.copy(broken / "unet" / "1" / "model.onnx", broken / "classifier" / "1" / "model.onnx")
    done = brainscan_server("--port", "0", "--model-repository", str(broken), timeout=120)
    assert done.returncode == 1
    assert "classifier" in done.stderr and "ONNX" in done.stderr


def test_gateway_reports_a_missing_repository(tmp_path):
    done = brainscan_server("--port", "0", "--model-repository", str(tmp_path / "nowhere"))
    assert done.returncode == 1
    assert "does not exist" in done.stderr


def test_generated_proto_code_is_fresh():
    from brainscan_proto.protogen import stale_files

    assert stale_files() == [], "run `python -m brainscan_proto.protogen` and commit the result"
