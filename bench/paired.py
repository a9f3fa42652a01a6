"""Added latency at concurrency 1, measured paired: floor call, gateway call, floor call, ...

On a shared machine the speed drifts by more than the few milliseconds being
measured, so a floor measured in one window and the gateway in another can
disagree by ±3 ms. Alternating the two on the same slice and taking the
median of the per-slice differences cancels that drift.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.floor import model_inputs, open_backend, run_models
from bench.load import GrpcAnalyze


def paired_added_latency(repository: Path, address: str, images: list[bytes], *, threads: int, pairs: int) -> dict[str, Any]:
    """Median of (gateway − floor) over `pairs` alternating calls, plus both sides' p50 (ms)."""
    backend = open_backend(repository, threads)
    feeds = [model_inputs(backend, data) for data in images]

    async def run() -> dict[str, Any]:
        gateway = GrpcAnalyze(address, images)
        floor_ms, gateway_ms = [], []
        try:
            for i in range(pairs + 4):  # the first 4 pairs warm both sides up
                item = i % len(images)
                started = time.perf_counter()
                run_models(backend, feeds[item])
                floor_done = time.perf_counter()
                await gateway(0, item)
                if i >= 4:
                    floor_ms.append((floor_done - started) * 1000.0)
                    gateway_ms.append((time.perf_counter() - floor_done) * 1000.0)
        finally:
            await gateway.close()
        diff = np.asarray(gateway_ms) - np.asarray(floor_ms)
        return {
            "pairs": pairs,
            "floor_p50_ms": round(float(np.median(floor_ms)), 3),
            "gateway_p50_ms": round(float(np.median(gateway_ms)), 3),
            "added_p50_ms": round(float(np.median(diff)), 3),
            "added_p90_ms": round(float(np.percentile(diff, 90)), 3),
        }

    try:
        return asyncio.run(run())
    finally:
        asyncio.run(backend.close())
