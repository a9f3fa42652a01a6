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


def alternating_calls(repository: Path, addresses: dict[str, str], images: list[bytes], *, threads: int,
                      rounds: int, warmup: int, rotate: bool = False) -> dict[str, np.ndarray]:
    """Milliseconds per call for the floor and each gateway, which take turns on the same slice every round.

    The first `warmup` rounds are not kept; with `rotate` the order of turns shifts by one each round.
    """
    backend = open_backend(repository, threads)
    feeds = [model_inputs(backend, data) for data in images]
    sides = ["floor", *addresses]

    async def run() -> dict[str, np.ndarray]:
        clients = {name: GrpcAnalyze(address, images) for name, address in addresses.items()}
        times: dict[str, list[float]] = {name: [] for name in sides}
        try:
            for r in range(rounds + warmup):
                item = r % len(images)
                shift = r % len(sides) if rotate else 0
                for name in sides[shift:] + sides[:shift]:
                    started = time.perf_counter()
                    if name == "floor":
                        run_models(backend, feeds[item])
                    else:
                        await clients[name](0, item)
                    if r >= warmup:
                        times[name].append((time.perf_counter() - started) * 1000.0)
        finally:
            for client in clients.values():
                await client.close()
        return {name: np.asarray(values) for name, values in times.items()}

    try:
        return asyncio.run(run())
    finally:
        asyncio.run(backend.close())


def added_latency(times: dict[str, np.ndarray], name: str) -> dict[str, float]:
    """`name`'s p50 and the median / p90 of its per-round difference to the floor (ms)."""
    diff = times[name] - times["floor"]
    return {
        "p50_ms": round(float(np.median(times[name])), 3),
        "added_p50_ms": round(float(np.median(diff)), 3),
        "added_p90_ms": round(float(np.percentile(diff, 90)), 3),
    }


def paired_added_latency(repository: Path, address: str, images: list[bytes], *, threads: int, pairs: int) -> dict[str, Any]:
    """Median of (gateway − floor) over `pairs` alternating calls, plus both sides' p50 (ms)."""
    times = alternating_calls(repository, {"gateway": address}, images, threads=threads, rounds=pairs, warmup=4)
    gateway = added_latency(times, "gateway")
    return {
        "pairs": pairs,
        "floor_p50_ms": round(float(np.median(times["floor"])), 3),
        "gateway_p50_ms": gateway["p50_ms"],
        "added_p50_ms": gateway["added_p50_ms"],
        "added_p90_ms": gateway["added_p90_ms"],
    }
