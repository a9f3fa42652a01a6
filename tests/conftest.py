"""Session fixtures: a tiny random-weight model repository written by the
project's own export code, real gateway processes on free loopback ports, and
(through tests/triton_fixtures.py) a real tritonserver.

Nothing here mocks gRPC, ONNX Runtime or Triton.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DATA_ROOT = Path(os.environ.get("BRAINSCAN_DATA", PROJECT_ROOT.parent / "shared" / "datasets"))

pytest_plugins = ["tests.triton_fixtures"]


@pytest.fixture(scope="session")
def data_root() -> Path:
    if not (DATA_ROOT / "sartaj-classification").is_dir():
        pytest.skip(f"datasets not found at {DATA_ROOT} (set BRAINSCAN_DATA); a fresh clone has no ../shared")
    return DATA_ROOT


@pytest.fixture(scope="session")
def tiny_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny random-weight classifier/unet/maskrcnn exported through export/ code.

    Set BRAINSCAN_TINY_REPOSITORY to reuse one written earlier (saves ~1 min
    when iterating locally).
    """
    reuse = os.environ.get("BRAINSCAN_TINY_REPOSITORY")
    if reuse and (Path(reuse) / "maskrcnn" / "config.pbtxt").is_file():
        return Path(reuse)
    from export.tiny import write_tiny_repository

    return write_tiny_repository(tmp_path_factory.mktemp("tiny_repository"))


@dataclass
class GatewayProcess:
    process: subprocess.Popen
    address: str
    log_path: Path
    backend: str

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.process.poll() is None


def start_gateway(
    repository: Path, log_dir: Path, *, backend: str = "embedded", extra: list[str] | None = None,
    env: dict[str, str] | None = None, timeout_s: float = 90.0,
    credentials: grpc.ChannelCredentials | None = None,
) -> GatewayProcess:
    """Start `brainscan-server --port 0` and wait until health says SERVING."""
    log_path = log_dir / f"gateway-{backend}-{time.monotonic_ns()}.log"
    command = [
        sys.executable, "-m", "gateway", "--host", "127.0.0.1", "--port", "0",
        "--backend", backend, "--model-repository", str(repository), *(extra or []),
    ]
    handle = log_path.open("w")
    process = subprocess.Popen(
        command, stdout=handle, stderr=subprocess.STDOUT, cwd=PROJECT_ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )
    deadline = time.monotonic() + timeout_s
    address = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"gateway exited with {process.returncode}:\n{log_path.read_text()}")
        for line in log_path.read_text().splitlines():
            if "serving on" in line:
                address = line.split("serving on ")[1].split()[0]
        if address and health_status(address, credentials=credentials) == health_pb2.HealthCheckResponse.SERVING:
            return GatewayProcess(process=process, address=address, log_path=log_path, backend=backend)
        time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"gateway not SERVING within {timeout_s} s:\n{log_path.read_text()}")


def stop_gateway(gateway: GatewayProcess) -> None:
    if gateway.alive():
        gateway.process.terminate()
        try:
            gateway.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            gateway.process.kill()
            gateway.process.wait()


def health_status(address: str, service: str = "", *, credentials: grpc.ChannelCredentials | None = None) -> int | None:
    channel = grpc.insecure_channel(address) if credentials is None else grpc.secure_channel(address, credentials)
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=2
            )
        except grpc.RpcError:
            return None
        return reply.status


@pytest.fixture(scope="session")
def embedded_gateway(tiny_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    gateway = start_gateway(tiny_repository, tmp_path_factory.mktemp("logs"))
    yield gateway
    stop_gateway(gateway)


@pytest.fixture(scope="session")
def triton_gateway(triton_server, tiny_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    gateway = start_gateway(
        tiny_repository, tmp_path_factory.mktemp("logs"), backend="triton",
        extra=["--triton-url", triton_server.grpc_url],
    )
    yield gateway
    stop_gateway(gateway)


@pytest.fixture(params=["embedded", "triton"])
def gateway(request: pytest.FixtureRequest) -> GatewayProcess:
    """The same test cases against both backends."""
    gateway = request.getfixturevalue(f"{request.param}_gateway")
    assert gateway.alive(), gateway.log()
    return gateway


def synthetic_slice(size: int = 240, *, seed: int = 0, dtype: type = np.uint8) -> np.ndarray:
    """A head-like ellipse with a bright blob: a valid slice for plumbing tests."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    head = ((yy - size / 2) / (0.42 * size)) ** 2 + ((xx - size / 2) / (0.36 * size)) ** 2 <= 1.0
    blob = (yy - 0.4 * size) ** 2 + (xx - 0.55 * size) ** 2 <= (0.08 * size) ** 2
    image = np.where(head, 0.45, 0.0) + np.where(blob, 0.4, 0.0) + rng.normal(0, 0.02, (size, size))
    image = np.clip(image, 0, 1)
    if dtype == np.uint8:
        return (image * 255).astype(np.uint8)
    if dtype == np.uint16:
        return (image * 65535).astype(np.uint16)
    return image.astype(dtype)


def png_bytes(array: np.ndarray) -> bytes:
    import cv2

    ok, encoded = cv2.imencode(".png", array)
    assert ok
    return encoded.tobytes()


def slice_folder(folder: Path, count: int, size: int) -> Path:
    """`count` synthetic PNG slices in a new `folder`, for a bench's --images."""
    folder.mkdir()
    for i in range(count):
        (folder / f"slice-{i}.png").write_bytes(png_bytes(synthetic_slice(size, seed=i)))
    return folder
