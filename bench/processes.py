"""The servers a bench run starts and stops: the gateway, a local Triton, the naive baseline.

Each runs in its own process with its log in the run's work folder; start-up
waits for readiness with a deadline and fails with the log's tail.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import InferenceServerClient

from gateway.config import PROJECT_ROOT

STARTUP_TIMEOUT_S = 240.0


class ServerFailed(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _spawn(command: list[str], log_path: Path, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.Popen:
    handle = log_path.open("w")
    return subprocess.Popen(
        command, stdout=handle, stderr=subprocess.STDOUT, cwd=cwd or PROJECT_ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )


def _serving(address: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
        except grpc.RpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING


def server_module(code: Path) -> list[str]:
    """How the code under `code` starts a gateway: `python -m gateway`, or `brainscan serve` in revisions before it."""
    return ["-m", "gateway"] if (code / "gateway" / "__main__.py").is_file() else ["-m", "brainscan.cli", "serve"]


@contextlib.contextmanager
def gateway(
    repository: Path, workdir: Path, *, backend: str = "embedded", triton_url: str | None = None,
    env: dict[str, str] | None = None, cwd: Path | None = None, started: Callable[[int], None] | None = None,
) -> Iterator[str]:
    """`brainscan-server` on a free loopback port; yields its address once health says SERVING.

    `cwd` (default: this checkout) is where `python -m` finds the gateway's code; `started` is called
    with the gateway's process id (to watch its memory).
    """
    log_path = workdir / f"gateway-{backend}.log"
    command = [sys.executable, *server_module(cwd or PROJECT_ROOT), "--host", "127.0.0.1", "--port", "0",
               "--backend", backend, "--model-repository", str(repository)]
    if triton_url:
        command += ["--triton-url", triton_url]
    process = _spawn(command, log_path, env, cwd)
    if started is not None:
        started(process.pid)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        address = None
        while address is None or not _serving(address):
            if process.poll() is not None or time.monotonic() > deadline:
                raise ServerFailed(f"gateway ({backend}) did not start:\n{_tail(log_path)}")
            for line in log_path.read_text(errors="replace").splitlines():
                if "serving on " in line:
                    address = line.split("serving on ")[1].split()[0]
            time.sleep(0.2)
        yield address
    finally:
        _stop(process)


@contextlib.contextmanager
def local_triton(repository: Path, workdir: Path, *, cwd: Path | None = None) -> Iterator[str]:
    """`python -m triton_local` (the code under `cwd`, default this checkout) on free ports; yields its gRPC address."""
    log_path = workdir / "triton.log"
    code = cwd or PROJECT_ROOT  # revisions before triton_local/ ran it as gateway.triton_local
    module = "triton_local" if (code / "triton_local" / "__main__.py").is_file() else "gateway.triton_local"
    command = [sys.executable, "-m", module, "--model-repository", str(repository),
               "--grpc-port", "0", "--http-port", "0", "--metrics-port", "0"]
    process = _spawn(command, log_path, None, cwd)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            ready = [line for line in log_path.read_text(errors="replace").splitlines() if "Triton ready on grpc " in line]
            if ready:
                yield ready[0].split("Triton ready on grpc ")[1].split(",")[0]
                return
            if process.poll() is not None or time.monotonic() > deadline:
                raise ServerFailed(f"local Triton did not start:\n{_tail(log_path)}")
            time.sleep(0.5)
    finally:
        _stop(process)


@contextlib.contextmanager
def naive_server(repository: Path, runs: Path, workdir: Path) -> Iterator[tuple[str, int]]:
    """bench.naive_server (Keras + a PyTorch worker process) on a free port; yields (host, port)."""
    port = free_port()
    log_path = workdir / "naive-server.log"
    command = [sys.executable, "-m", "bench.naive_server", "--port", str(port),
               "--model-repository", str(repository), "--runs", str(runs)]
    process = _spawn(command, log_path)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not _http_ok(f"http://127.0.0.1:{port}/health"):
            if process.poll() is not None or time.monotonic() > deadline:
                raise ServerFailed(f"naive server did not start:\n{_tail(log_path)}")
            time.sleep(0.5)
        yield "127.0.0.1", port
    finally:
        _stop(process)


def http_get(url: str, timeout_s: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        return response.read()


def _http_ok(url: str) -> bool:
    try:
        http_get(url, 2.0)
        return True
    except OSError:
        return False


def batch_histograms(address: str) -> dict[str, dict[int, int]]:
    """model → {batch size: executions}, from a KServe ModelStatistics endpoint (Triton or the gateway)."""
    client = InferenceServerClient(address)
    try:
        reply = client.get_inference_statistics()
    finally:
        client.close()
    return {
        stats.name: {int(b.batch_size): int(b.compute_infer.count) for b in stats.batch_stats}
        for stats in reply.model_stats
    }


def histogram_delta(after: dict[str, dict[int, int]], before: dict[str, dict[int, int]]) -> dict[str, dict[int, int]]:
    delta: dict[str, dict[int, int]] = {}
    for model, sizes in after.items():
        old = before.get(model, {})
        changed = {size: count - old.get(size, 0) for size, count in sorted(sizes.items())}
        changed = {size: count for size, count in changed.items() if count > 0}
        if changed:
            delta[model] = changed
    return delta
