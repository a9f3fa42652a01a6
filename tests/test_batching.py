"""Micro-batching on real ONNX Runtime sessions, in-process and through a real gateway,
and a smoke run of the pipeline bench (`python -m bench.pipeline --quick`).

No mocks: the tiny repository's sessions run every batch.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from bench.processes import batch_histograms
from brainscan_proto.v1 import brainscan_pb2 as pb
from brainscan_proto.v1 import brainscan_pb2_grpc as pb_grpc
from gateway.backends.embedded import EmbeddedBackend, ThreadBudget
from tests.conftest import PROJECT_ROOT, png_bytes, slice_folder, start_gateway, stop_gateway, synthetic_slice


def _inputs(size: int, count: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.random((1, size, size, 1), dtype=np.float32) for _ in range(count)]


def _run(coroutine):
    return asyncio.run(coroutine)


def test_concurrent_requests_share_batches_and_get_their_own_rows(tiny_repository: Path) -> None:
    async def scenario() -> None:
        backend = EmbeddedBackend(tiny_repository, threads=2, batch_max_size=8, batch_max_delay_ms=20)
        await backend.start()
        try:
            for model, output in (("classifier", "probabilities"), ("unet", "mask")):
                size = backend.specs[model].input_size
                inputs = _inputs(size, 24, seed=len(model))
                alone = [backend.run_session(model, {"image": x})[output] for x in inputs]
                together = await asyncio.gather(*(backend.infer(model, {"image": x}) for x in inputs))
                for mine, reference in zip(together, alone):
                    assert mine[output].shape == reference.shape
                    np.testing.assert_allclose(mine[output], reference, rtol=1e-5, atol=1e-6)
                histogram = backend.batch_stats()[model]
                assert max(histogram) > 1, histogram
                assert max(histogram) <= 8, histogram
                assert sum(size * count for size, count in histogram.items()) == 24
        finally:
            await backend.close()

    _run(scenario())


def test_thread_budget_gives_every_core_to_a_lone_run_and_to_the_slowest_model() -> None:
    budget = ThreadBudget(wide=4, shared=2)
    budget.slowest = "maskrcnn"
    first = budget.take("classifier")
    assert first == 4  # nothing else in flight
    assert budget.take("unet") == 2  # overlaps the classifier
    assert budget.take("maskrcnn") == 4  # the critical path keeps every core
    for threads in (first, 2, 4):
        budget.give(threads)
    assert budget.take("unet") == 4  # all given back: alone again


def test_wide_and_shared_sessions_of_a_model_agree(tiny_repository: Path) -> None:
    async def scenario() -> None:
        backend = EmbeddedBackend(tiny_repository, threads=2, batch_max_delay_ms=0)
        await backend.start()
        try:
            assert backend.budget.slowest in backend.specs  # measured by the warm-up runs
            backend.budget.slowest = None  # whichever tiny model was slowest, unet runs shared below
            x = _inputs(backend.specs["unet"].input_size, 1)[0]
            wide = backend.run_session("unet", {"image": x})["mask"]  # alone: the wide session
            backend.budget.take("classifier")  # another run in flight: the next unet run is shared
            shared = backend.run_session("unet", {"image": x})["mask"]
            np.testing.assert_allclose(shared, wide, rtol=1e-5, atol=1e-6)
            assert {backend.budget.wide, backend.budget.shared} == {2, 1}
        finally:
            await backend.close()

    _run(scenario())


def test_a_lone_caller_never_waits_for_company(tiny_repository: Path) -> None:
    async def scenario() -> None:
        # a 2 s delay would show in every call if the batcher waited for a batch to fill
        backend = EmbeddedBackend(tiny_repository, threads=2, batch_max_size=8, batch_max_delay_ms=2000)
        await backend.start()
        try:
            for x in _inputs(backend.specs["classifier"].input_size, 5):
                started = time.perf_counter()
                await backend.infer("classifier", {"image": x})
                assert time.perf_counter() - started < 1.5
            assert backend.batch_stats()["classifier"] == {1: 5}
        finally:
            await backend.close()

    _run(scenario())


def test_batching_off_runs_each_request_alone(tiny_repository: Path) -> None:
    async def scenario() -> None:
        backend = EmbeddedBackend(tiny_repository, threads=2, batch_max_size=8, batch_max_delay_ms=0)
        await backend.start()
        try:
            inputs = _inputs(backend.specs["classifier"].input_size, 6)
            await asyncio.gather(*(backend.infer("classifier", {"image": x}) for x in inputs))
            assert backend.batch_stats()["classifier"] == {1: 6}
        finally:
            await backend.close()

    _run(scenario())


def test_a_caller_that_gives_up_does_not_break_the_batch(tiny_repository: Path) -> None:
    async def scenario() -> None:
        backend = EmbeddedBackend(tiny_repository, threads=2, batch_max_size=8, batch_max_delay_ms=50)
        await backend.start()
        try:
            inputs = _inputs(backend.specs["classifier"].input_size, 8)
            calls = [asyncio.ensure_future(backend.infer("classifier", {"image": x})) for x in inputs]
            calls[3].cancel()
            results = await asyncio.gather(*calls, return_exceptions=True)
            assert isinstance(results[3], asyncio.CancelledError)
            for index, (x, result) in enumerate(zip(inputs, results)):
                if index != 3:
                    reference = backend.run_session("classifier", {"image": x})["probabilities"]
                    np.testing.assert_allclose(result["probabilities"], reference, rtol=1e-5, atol=1e-6)
        finally:
            await backend.close()

    _run(scenario())


def test_gateway_batches_concurrent_analyze_calls(tiny_repository: Path, tmp_path: Path) -> None:
    """Two real gateways, batching on and off: the same answers, and batches > 1 only with it on."""
    images = [png_bytes(synthetic_slice(200 + 4 * i, seed=i)) for i in range(16)]
    answers: dict[str, list[pb.AnalyzeResponse]] = {}
    histograms = {}
    for mode, delay in (("on", "50"), ("off", "0")):
        gateway = start_gateway(  # KServe on: its statistics report the batch sizes
            tiny_repository, tmp_path, env={"BRAINSCAN_BATCH_MAX_DELAY_MS": delay}, extra=["--kserve"])
        try:
            answers[mode] = _analyze_concurrently(gateway.address, images)
            histograms[mode] = batch_histograms(gateway.address)
        finally:
            stop_gateway(gateway)
    assert max(histograms["on"]["classifier"]) > 1, histograms
    assert set(histograms["off"]["classifier"]) == {1}, histograms
    for with_batching, without in zip(answers["on"], answers["off"]):
        assert with_batching.image_id == without.image_id
        assert with_batching.label == without.label
        for label, p in without.probabilities.items():
            assert with_batching.probabilities[label] == pytest.approx(p, abs=1e-5)
    # (U-Net rows are compared in-process above; a random U-Net's ~0.5 probabilities make
    # thresholded masks too sensitive to float rounding to compare across processes)


def _analyze_concurrently(address: str, images: list[bytes]) -> list[pb.AnalyzeResponse]:
    import grpc

    async def run() -> list[pb.AnalyzeResponse]:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pb_grpc.BrainScanStub(channel)
            requests = [
                pb.AnalyzeRequest(encoded=data, image_id=str(i), options=pb.AnalyzeOptions(ungated=True))
                for i, data in enumerate(images)
            ]
            return list(await asyncio.gather(*(stub.Analyze(r, timeout=120) for r in requests)))

    return asyncio.run(run())


def test_bench_quick_smoke(tiny_repository: Path, tmp_path: Path) -> None:
    """`python -m bench.pipeline --quick` on the floor and the embedded gateway writes comparable JSON."""
    images = slice_folder(tmp_path / "images", 3, 224)
    out = tmp_path / "results"
    command = [
        sys.executable, "-m", "bench.pipeline", "--quick", "--systems", "floor,embedded",
        "--model-repository", str(tiny_repository), "--images", str(images), "--out", str(out),
    ]
    result = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "| gateway, embedded ORT | 4 |" in result.stdout
    [written] = list(out.glob("*.json"))
    data = json.loads(written.read_text())
    assert data["floor"]["models"]["completed"] > 0
    points = data["systems"]["embedded"]
    assert [p["concurrency"] for p in points] == [1, 4]
    for point in points:
        assert point["completed"] > 0 and point["errors"] == 0, point
        assert "x_floor" in point and "added_p50_ms" in point
        assert set(point["batch_sizes"]) >= {"classifier", "unet", "maskrcnn"}
    assert set(data["targets"]) >= {"embedded.added_p50_ms_c1", "embedded.throughput_vs_floor_c16"}
    paired = data["paired_c1"]["embedded"]
    assert paired["pairs"] == 8 and paired["floor_p50_ms"] > 0 and paired["gateway_p50_ms"] > 0
    assert data["targets"]["embedded.added_p50_ms_c1"]["value"] == paired["added_p50_ms"]
    assert "Paired at concurrency 1" in result.stdout


def test_bench_ab_smoke(tiny_repository: Path, tmp_path: Path) -> None:
    """`python -m bench.ab` serves this checkout and HEAD side by side and reports both."""
    inside_git = subprocess.run(["git", "-C", str(PROJECT_ROOT), "rev-parse", "HEAD"], capture_output=True)
    if inside_git.returncode != 0:
        pytest.skip("bench ab compares git revisions; this checkout is not a git repository")
    images = slice_folder(tmp_path / "images", 2, 200)
    out = tmp_path / "ab.json"
    command = [
        sys.executable, "-m", "bench.ab", "--baseline", "HEAD", "--model-repository", str(tiny_repository),
        "--images", str(images), "--rounds", "3", "--windows", "1", "--window-s", "1", "--concurrency", "2",
        "--out", str(out),
    ]
    result = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "| baseline HEAD |" in result.stdout and "| this checkout |" in result.stdout
    data = json.loads(out.read_text())
    for build in ("this", "baseline"):
        assert data["concurrency_1"][build]["p50_ms"] > 0
        assert data["concurrency_2"][build]["median_per_s"] > 0
    worktrees = subprocess.run(["git", "-C", str(PROJECT_ROOT), "worktree", "list"], capture_output=True, text=True)
    assert "brainscan-ab-" not in worktrees.stdout  # the baseline checkout is removed afterwards


def test_bench_ab_refuses_an_unknown_revision() -> None:
    result = subprocess.run([sys.executable, "-m", "bench.ab", "--baseline", "no-such-revision-xyz"],
                            cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "is not a commit" in result.stderr
