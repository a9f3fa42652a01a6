"""Closed-loop load: N concurrent workers, each sending its next request as soon as
the last one answered; a warm-up, then a timed window whose completions count.

Targets are small callables `call(worker, item)`: the gateway's Analyze over one
shared grpc.aio channel, or the naive HTTP server over one keep-alive
connection per worker. Requests are built once, before the clock starts, and
answers are not parsed, so the client spends as little CPU as it can on a
machine it shares with the server.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import grpc
import numpy as np

from brainscan_proto.v1 import brainscan_pb2 as pb
from brainscan_proto.v1 import brainscan_pb2_grpc as pb_grpc

Call = Callable[[int, int], Awaitable[None]]
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


@dataclass
class LoadResult:
    concurrency: int
    duration_s: float
    latencies_ms: list[float] = field(default_factory=list)
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)

    @property
    def completed(self) -> int:
        return len(self.latencies_ms)

    def summary(self) -> dict[str, float | int | list[str]]:
        lat = np.asarray(self.latencies_ms or [float("nan")])
        return {
            "concurrency": self.concurrency,
            "completed": self.completed,
            "errors": self.errors,
            "duration_s": round(self.duration_s, 3),
            "throughput_per_s": round(self.completed / self.duration_s, 3) if self.duration_s else 0.0,
            "p50_ms": round(float(np.percentile(lat, 50)), 3),
            "p90_ms": round(float(np.percentile(lat, 90)), 3),
            "p99_ms": round(float(np.percentile(lat, 99)), 3),
            "mean_ms": round(float(lat.mean()), 3),
            "error_samples": self.error_samples[:3],
        }


async def closed_loop(call: Call, *, items: int, concurrency: int, warmup_s: float, duration_s: float) -> LoadResult:
    """Run `concurrency` workers for warmup_s + duration_s; keep what completes inside the window."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    window_start, window_end = start + warmup_s, start + warmup_s + duration_s
    result = LoadResult(concurrency=concurrency, duration_s=duration_s)
    counter = iter(range(1 << 62))

    async def worker(index: int) -> None:
        while loop.time() < window_end:
            item = next(counter) % items
            sent = time.perf_counter()
            try:
                await call(index, item)
            except Exception as error:  # counted and sampled, never fatal to the run
                if loop.time() >= window_start:
                    result.errors += 1
                    if len(result.error_samples) < 3:
                        result.error_samples.append(f"{type(error).__name__}: {str(error)[:200]}")
                continue
            done = loop.time()
            if window_start <= done <= window_end:
                result.latencies_ms.append((time.perf_counter() - sent) * 1000.0)

    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return result


class GrpcAnalyze:
    """Analyze over one grpc.aio channel; every image runs all three models (ungated)."""

    def __init__(self, address: str, images: list[bytes], *, timeout_s: float = 120.0) -> None:
        options = [
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ]
        self._channel = grpc.aio.insecure_channel(address, options=options)
        self._stub = pb_grpc.BrainScanStub(self._channel)
        self._requests = [
            pb.AnalyzeRequest(encoded=data, options=pb.AnalyzeOptions(ungated=True)) for data in images
        ]
        self._timeout_s = timeout_s

    async def __call__(self, worker: int, item: int) -> None:
        await self._stub.Analyze(self._requests[item], timeout=self._timeout_s)

    async def close(self) -> None:
        await self._channel.close()


class HttpAnalyze:
    """POST /analyze with the encoded image as the body, one keep-alive connection per worker.

    A few lines of HTTP/1.1 over asyncio streams: no client library, nothing parsed but the length.
    """

    def __init__(self, host: str, port: int, images: list[bytes], *, path: str = "/analyze") -> None:
        self.host, self.port = host, port
        self._requests = [
            (
                f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/octet-stream\r\n"
                f"Content-Length: {len(data)}\r\n\r\n"
            ).encode()
            + data
            for data in images
        ]
        self._connections: dict[int, tuple[asyncio.StreamReader, asyncio.StreamWriter]] = {}

    async def __call__(self, worker: int, item: int) -> None:
        if worker not in self._connections:
            self._connections[worker] = await asyncio.open_connection(self.host, self.port)
        reader, writer = self._connections[worker]
        try:
            writer.write(self._requests[item])
            await writer.drain()
            status = await reader.readline()
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            body = await reader.readexactly(length)
        except (OSError, asyncio.IncompleteReadError):
            self._connections.pop(worker, None)
            writer.close()
            raise
        if b" 200 " not in status:
            raise RuntimeError(f"HTTP {status.decode(errors='replace').strip()}: {body[:200]!r}")

    async def close(self) -> None:
        for _, writer in self._connections.values():
            writer.close()
        self._connections.clear()
