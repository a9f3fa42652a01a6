"""Past one Triton: one gateway over two real tritonservers, one of them killed under load.

Both servers are local tritonservers (triton_local/runner.py) on free loopback
ports; the gateway is a real `brainscan-server --backend triton` process with
both in --triton-url; the load comes through the SDK. Which server answered is
read from each Triton's own statistics, not from the gateway.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from brainscan import Client, ServerUnavailable
from gateway.backends.triton import TritonBackend
from gateway.config import load_config, triton_targets
from gateway.request_clock import deadline_after
from gateway.server import LIVENESS_SERVICE
from triton_local.runner import LocalTriton
from tests.conftest import png_bytes, start_gateway, stop_gateway, synthetic_slice

CLIENTS = 3  # bounded load: this many callers, one call in flight each
CALL_TIMEOUT_S = 20.0


def health(address: str, service: str = "") -> str:
    """The gateway's health status by name; a generous timeout, since the load keeps 2 cores busy."""
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        except grpc.RpcError as error:
            return f"no answer ({error.code().name})"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def served_calls(triton: LocalTriton, model: str = "classifier") -> int:
    """Successful inferences of `model` since this server started (Triton's own statistics)."""
    with urllib.request.urlopen(f"{triton.http_url}/v2/models/{model}/stats", timeout=5) as reply:
        stats = json.load(reply)["model_stats"]
    return sum(int(s["inference_stats"]["success"]["count"]) for s in stats)


class Load:
    """CLIENTS threads calling Analyze in a loop; each outcome is counted under the current phase."""

    def __init__(self, address: str, image: bytes) -> None:
        self.address, self.image = address, image
        self.phase = "both up"
        self.counts: dict[str, Counter[str]] = {}
        self.unexpected: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(CLIENTS)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=CALL_TIMEOUT_S + 5)

    def total(self, phase: str, outcome: str) -> int:
        with self._lock:
            return self.counts.get(phase, Counter())[outcome]

    def _count(self, phase: str, outcome: str) -> None:
        with self._lock:
            self.counts.setdefault(phase, Counter())[outcome] += 1

    def _run(self) -> None:
        with Client(self.address, timeout_s=CALL_TIMEOUT_S) as client:
            while not self._stop.is_set():
                phase = self.phase  # the phase the call started in
                try:
                    result = client.analyze(self.image, gate=False)  # classifier, U-Net and Mask R-CNN
                    self._count(phase, "ok" if result.label else "empty answer")
                except ServerUnavailable:  # UNAVAILABLE: the one retryable failure allowed
                    self._count(phase, "UNAVAILABLE")
                except Exception as error:  # anything else fails the test
                    self._count(phase, type(error).__name__)
                    with self._lock:
                        self.unexpected.append(f"{phase}: {error!r}")


def wait_for(condition, timeout_s: float, what: str) -> float:
    """Poll `condition` until true; return the seconds it took."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout_s, f"not within {timeout_s} s: {what}"
        time.sleep(0.1)
    return time.monotonic() - started


@pytest.fixture
def two_tritons(tiny_repository: Path) -> Iterator[tuple[LocalTriton, LocalTriton]]:
    first = LocalTriton(tiny_repository, startup_timeout_s=120)
    second = LocalTriton(tiny_repository, startup_timeout_s=120)
    try:
        first.start()
        second.start()
        yield first, second
    finally:
        first.close()
        second.close()


def test_one_gateway_rides_out_a_triton_crash(two_tritons: tuple[LocalTriton, LocalTriton], tiny_repository: Path, tmp_path: Path) -> None:
    first, second = two_tritons
    gateway = start_gateway(
        tiny_repository, tmp_path, backend="triton", extra=["--triton-url", f"{first.grpc_url},{second.grpc_url}", "--health-port", "0"],
    )
    health_port = gateway.log().split("plaintext health on :")[1].split()[0].rstrip(")")
    probes = f"127.0.0.1:{health_port}"  # what kubelet probes: health alone, plaintext
    image = png_bytes(synthetic_slice(160, seed=3))
    try:
        with Load(gateway.address, image) as load:
            wait_for(lambda: load.total("both up", "ok") >= 12, 30, "12 calls with both servers up")
            spread = served_calls(first), served_calls(second)

            first.kill()  # then the phase: every call counted under it starts after the crash
            before = served_calls(second)
            load.phase = "one killed"
            down_until = time.monotonic() + 4.0
            while time.monotonic() < down_until:  # the survivor keeps the gateway SERVING
                assert health(gateway.address) == "SERVING", gateway.log()[-3000:]
                time.sleep(0.2)
            wait_for(lambda: load.total("one killed", "ok") >= 6, 20, "6 calls with one server killed")
            ok_down = load.total("one killed", "ok")
            time.sleep(0.5)  # Triton counts a success as it releases the request, just after answering
            taken = served_calls(second) - before

            load.phase = "back"
            first.start()  # same ports
            back_s = wait_for(lambda: served_calls(first) >= 3, 20, "the restarted server answering calls again")
            wait_for(lambda: load.total("back", "ok") >= 6, 20, "6 calls after the restart")
        phase_counts = {phase: dict(counts) for phase, counts in load.counts.items()}
        print(f"\ncalls by phase: {phase_counts}")
        print(f"classifier calls served with both up: first {spread[0]}, second {spread[1]}; "
              f"by the second while the first was down: {taken} (calls answered then: {ok_down}); "
              f"restarted server back in rotation after {back_s:.1f} s")

        assert not load.unexpected, load.unexpected[:5]  # every failure is a clear, retryable UNAVAILABLE
        assert spread[0] > 0 and spread[1] > 0, f"calls not spread over both servers: {spread}"
        assert taken >= ok_down, "the surviving server did not take the calls answered while the other was down"
        log = gateway.log()
        assert "out of rotation" in log and "in rotation" in log, log[-3000:]

        # with no Triton left, health (readiness) turns NOT_SERVING and calls fail UNAVAILABLE;
        # liveness stays SERVING, so an orchestrator takes the gateway out of rotation without restarting it
        assert health(probes) == health(probes, LIVENESS_SERVICE) == "SERVING"
        first.kill()
        second.kill()
        wait_for(lambda: health(gateway.address) == "NOT_SERVING", 10, "NOT_SERVING once no Triton is ready")
        assert health(probes) == "NOT_SERVING" and health(probes, LIVENESS_SERVICE) == "SERVING"
        with Client(gateway.address, timeout_s=CALL_TIMEOUT_S) as client, pytest.raises(ServerUnavailable):
            client.analyze(image, gate=False)
    finally:
        stop_gateway(gateway)


def test_calls_in_flight_on_a_dying_server_are_retried_on_the_other(
    two_tritons: tuple[LocalTriton, LocalTriton], tiny_repository: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first, second = two_tritons
    caplog.set_level(logging.DEBUG, logger="gateway.backends.triton")

    async def check() -> tuple[int, int, int]:
        backend = TritonBackend(f"{first.grpc_url},{second.grpc_url}", tiny_repository)
        await backend.start()
        spec = backend.specs["maskrcnn"]  # the slowest model: calls stay in flight longest
        inputs = {t.name: np.random.default_rng(0).random(
            ([1] if spec.max_batch_size else []) + [spec.input_size if d < 0 else d for d in t.dims], dtype=np.float32
        ) for t in spec.inputs}
        outcomes: Counter[str] = Counter()
        stop = asyncio.Event()

        async def caller() -> None:
            while not stop.is_set():
                try:
                    await backend.infer("maskrcnn", inputs, deadline=deadline_after(CALL_TIMEOUT_S))
                    outcomes["ok"] += 1
                except Exception as error:
                    outcomes[repr(error)] += 1

        callers = [asyncio.create_task(caller()) for _ in range(2 * CLIENTS)]
        try:
            await asyncio.sleep(1.0)
            in_flight = backend.endpoints[first.grpc_url].in_flight
            first.kill()  # blocks the loop: the calls in flight on it see the connection drop
            await asyncio.sleep(1.5)
        finally:
            stop.set()
            await asyncio.gather(*callers)
            await backend.close()
        assert set(outcomes) == {"ok"}, outcomes
        return in_flight, outcomes["ok"], sum("retrying" in r.getMessage() for r in caplog.records)

    in_flight, answered, retried = asyncio.run(check())
    print(f"\nin flight on the killed server: {in_flight}; calls retried on the other: {retried}; all {answered} answered")
    assert in_flight > 0, "no call was in flight on the server when it was killed"


def test_a_dns_target_stands_for_every_address_it_resolves_to(running_triton: LocalTriton, tiny_repository: Path) -> None:
    port = running_triton.ports["grpc"]

    async def check() -> None:
        backend = TritonBackend(f"dns:///localhost:{port}", tiny_repository)
        await backend.start()
        try:
            assert f"127.0.0.1:{port}" in backend.endpoints and await backend.is_ready()
            spec = backend.specs["classifier"]
            image = np.zeros((1, *[spec.input_size if d < 0 else d for d in spec.inputs[0].dims]), np.float32)
            answer = await backend.infer("classifier", {spec.inputs[0].name: image}, deadline=deadline_after(30))
            assert answer["probabilities"].shape[0] == 1
        finally:
            await backend.close()

    asyncio.run(check())


def test_triton_url_takes_a_list_and_refuses_a_malformed_one() -> None:
    assert triton_targets("a:8001, b:8001") == ("a:8001", "b:8001")
    assert triton_targets("dns:///triton.brainscan.svc:8001") == ("dns:///triton.brainscan.svc:8001",)
    for bad in ("", "a:8001,", "a", "dns:///name", "a:99999"):
        with pytest.raises(ValueError, match="not host:port or dns:///name:port"):
            load_config({"backend": "triton", "triton_url": bad}, environ={})
