"""Operating the gateway: metrics, request ids, JSON logs, overload, deadlines,
graceful shutdown, a bounded load test with a memory check, and random
bytes/shapes/dtypes thrown at Analyze (hypothesis)."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from brainscan import AsyncClient, Client, DeadlineExceeded, Overloaded
from brainscan_proto.v1 import brainscan_pb2 as pb
from brainscan_proto.v1 import brainscan_pb2_grpc as pb_grpc
from tests.conftest import png_bytes, start_gateway, stop_gateway, synthetic_slice


@pytest.fixture(scope="module")
def ops_gateway(tiny_repository: Path, tmp_path_factory: pytest.TempPathFactory):
    """A gateway with metrics on and a small in-flight limit so overload is reachable."""
    gateway = start_gateway(
        tiny_repository, tmp_path_factory.mktemp("logs"), extra=["--metrics-port", "0", "--max-in-flight", "4"]
    )
    yield gateway
    stop_gateway(gateway)


def metrics_text(gateway) -> str:
    port = int(gateway.log().split("metrics on :")[1].split("/")[0])
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def test_request_id_is_echoed_in_trailing_metadata_and_logs(ops_gateway):
    with grpc.insecure_channel(ops_gateway.address) as channel:
        stub = pb_grpc.BrainScanStub(channel)
        request = pb.AnalyzeRequest(encoded=png_bytes(synthetic_slice(96)))
        _, call = stub.Analyze.with_call(request, metadata=(("x-request-id", "req-abc-123"),), timeout=30)
        assert ("x-request-id", "req-abc-123") in tuple(call.trailing_metadata())
        _, call = stub.Analyze.with_call(request, timeout=30)
        generated = dict(call.trailing_metadata())["x-request-id"]
        assert len(generated) == 32
        with pytest.raises(grpc.RpcError) as caught:
            stub.Analyze(pb.AnalyzeRequest(encoded=b"junk"), metadata=(("x-request-id", "req-bad-1"),), timeout=30)
        assert ("x-request-id", "req-bad-1") in tuple(caught.value.trailing_metadata())
    time.sleep(0.3)
    entries = [json.loads(line) for line in ops_gateway.log().splitlines() if line.startswith("{")]
    mine = {e["request_id"]: e for e in entries if e.get("msg") == "rpc"}
    assert mine["req-abc-123"]["code"] == "OK" and mine["req-abc-123"]["method"].endswith("/Analyze")
    assert mine["req-bad-1"]["code"] == "INVALID_ARGUMENT"
    assert generated in mine


def test_metrics_count_methods_codes_stages_and_models(ops_gateway):
    with Client(ops_gateway.address) as client:
        client.analyze(synthetic_slice(96), gate=False)
    text = metrics_text(ops_gateway)
    assert 'brainscan_requests_total{code="OK",method="/brainscan.v1.BrainScan/Analyze"}' in text
    for stage in ("decode", "preprocess", "classifier", "unet", "maskrcnn", "total"):
        assert f'brainscan_stage_seconds_count{{stage="{stage}"}}' in text, stage
    assert "brainscan_in_flight" in text
    assert 'brainscan_model_info{backend="embedded",model="classifier",version="1"} 1.0' in text


def test_a_spent_deadline_is_deadline_exceeded(ops_gateway):
    with Client(ops_gateway.address) as client:
        with pytest.raises(DeadlineExceeded):
            client.analyze(synthetic_slice(2000), timeout_s=0.001)
        assert client.analyze(synthetic_slice(96)).label


def test_overload_is_resource_exhausted_never_an_unbounded_queue(ops_gateway):
    image = png_bytes(synthetic_slice(1500))

    async def burst() -> list[BaseException | object]:
        # No deadline: a call that finds every slot taken is refused at once (with one, it would
        # wait for a slot up to its deadline, and a fast machine could drain the queue in time).
        async with AsyncClient(ops_gateway.address, timeout_s=None) as client:
            calls = [client.analyze(image, gate=False) for _ in range(24)]
            return await asyncio.gather(*calls, return_exceptions=True)

    outcomes = asyncio.run(burst())
    refused = [o for o in outcomes if isinstance(o, Overloaded)]
    unexpected = [o for o in outcomes if isinstance(o, BaseException) and not isinstance(o, Overloaded)]
    assert not unexpected, unexpected
    assert refused, "24 concurrent requests without a deadline against 4 slots should see RESOURCE_EXHAUSTED"
    assert "in flight" in str(refused[0])
    with Client(ops_gateway.address) as client:
        assert client.analyze(synthetic_slice(96)).label


def test_bounded_load_keeps_memory_flat(tiny_repository, tmp_path):
    """2,000 requests at concurrency 32; RSS after the run within 10% of RSS after warm-up."""
    gateway = start_gateway(tiny_repository, tmp_path, extra=["--max-in-flight", "64", "--log-level", "WARNING"])
    images = [png_bytes(synthetic_slice(160, seed=i)) for i in range(8)]

    async def drive(total: int, concurrency: int) -> list[object]:
        results: list[object] = []
        async with AsyncClient(gateway.address) as client:
            queue = iter(range(total))

            async def worker() -> None:
                for index in queue:
                    try:
                        results.append(await client.analyze(images[index % 8], gate=index % 2 == 0, timeout_s=60))
                    except Exception as error:  # collected and asserted below
                        results.append(error)

            await asyncio.gather(*(worker() for _ in range(concurrency)))
        return results

    try:
        warm = asyncio.run(drive(300, 32))
        assert not [r for r in warm if isinstance(r, Exception) and not isinstance(r, Overloaded)]
        after_warm_up = rss_bytes(gateway.process.pid)
        outcomes = asyncio.run(drive(2000, 32))
        after_run = rss_bytes(gateway.process.pid)
        errors = [r for r in outcomes if isinstance(r, Exception) and not isinstance(r, Overloaded)]
        assert not errors, errors[:3]
        assert len(outcomes) == 2000
        assert after_run <= 1.10 * after_warm_up, (after_warm_up, after_run)
    finally:
        stop_gateway(gateway)


def test_sigterm_drains_in_flight_requests_and_goes_not_serving_first(tiny_repository, tmp_path):
    gateway = start_gateway(tiny_repository, tmp_path)
    slow_image = png_bytes(synthetic_slice(4000))  # a few hundred ms of work in the gateway
    outcome: dict[str, object] = {}
    watched: list[int] = []

    def slow_call() -> None:
        with Client(gateway.address) as client:
            try:
                outcome["result"] = client.analyze(slow_image, gate=False, timeout_s=60)
            except Exception as error:
                outcome["error"] = error

    def watch_health() -> None:
        with grpc.insecure_channel(gateway.address) as channel:
            try:
                for reply in health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=60):
                    watched.append(reply.status)
            except grpc.RpcError:
                pass

    watcher = threading.Thread(target=watch_health)
    watcher.start()
    deadline = time.monotonic() + 10
    while not watched and time.monotonic() < deadline:
        time.sleep(0.02)
    caller = threading.Thread(target=slow_call)
    caller.start()
    time.sleep(0.15)
    gateway.process.send_signal(signal.SIGTERM)
    caller.join(timeout=60)
    gateway.process.wait(timeout=60)
    watcher.join(timeout=10)
    log = gateway.log()
    assert gateway.process.returncode == 0, log
    assert "result" in outcome, outcome.get("error")
    # the call finished after shutdown began: it was drained, not cut off
    assert log.index("shutting down") < log.rindex('"method": "/brainscan.v1.BrainScan/Analyze"'), log
    assert watched[0] == health_pb2.HealthCheckResponse.SERVING
    assert health_pb2.HealthCheckResponse.NOT_SERVING in watched


raw_dtypes = st.sampled_from(["uint8", "uint16", "int16", "float32", "float64", "int32", "bool", "", "complex64"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    payload=st.one_of(
        st.binary(max_size=2048),
        st.binary(max_size=512).map(lambda tail: b"\x89PNG\r\n\x1a\n" + tail),
        st.binary(max_size=512).map(lambda tail: b"\xff\xd8\xff" + tail),
        st.binary(max_size=512).map(lambda tail: b"\x00" * 128 + b"DICM" + tail),
        st.integers(0, 4000).map(lambda cut: png_bytes(synthetic_slice(64))[:cut]),
    ),
    shape=st.lists(st.integers(0, 70), min_size=0, max_size=4),
    dtype=raw_dtypes,
    use_raw=st.booleans(),
)
def test_random_input_always_gets_a_proper_status(ops_gateway, payload, shape, dtype, use_raw):
    valid = png_bytes(synthetic_slice(64))
    with grpc.insecure_channel(ops_gateway.address) as channel:
        stub = pb_grpc.BrainScanStub(channel)
        if use_raw:
            request = pb.AnalyzeRequest(raw=pb.RawPixels(data=payload, shape=shape, dtype=dtype))
        else:
            request = pb.AnalyzeRequest(encoded=payload)
        try:
            reply = stub.Analyze(request, timeout=30)
            assert reply.label  # a random payload that happens to be a valid image
        except grpc.RpcError as error:
            assert error.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED), (
                error.code(), error.details()
            )
            assert error.details() and "Traceback" not in error.details()
        assert stub.Analyze(pb.AnalyzeRequest(encoded=valid), timeout=30).label


def test_a_failing_step_cancels_its_siblings():
    """When one model call of a request fails, the request's other calls are cancelled, not left running."""
    from gateway.pipeline import _all

    async def scenario() -> asyncio.Task:
        started = asyncio.Event()

        async def slow() -> None:
            started.set()
            await asyncio.sleep(30)

        async def failing() -> None:
            await started.wait()
            raise DeadlineExceeded("deadline exceeded before the unet stage")

        slow_task = asyncio.ensure_future(slow())
        with pytest.raises(DeadlineExceeded):
            await _all(slow_task, failing())
        await asyncio.sleep(0)
        return slow_task

    assert asyncio.run(scenario()).cancelled()
