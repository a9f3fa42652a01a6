"""Micro-batching: concurrent requests for one model become one ONNX Runtime call.

    infer ─submit()─▶ queue ─▶ collector ─▶ run(batch) in the executor ─▶ split rows ─▶ each caller

- A batch closes at `max_batch` rows, or `max_delay_s` after its first request
  arrived. The collector only waits for company when requests lately overlapped
  (most arrived while another was still in flight) and arrived faster than that
  delay (moving averages of both), so a lone caller's request runs at once:
  concurrency 1 pays no batching delay.
- At most `max_concurrent` batches of a model run at a time. Requests that
  arrive meanwhile queue up and leave together in the next batch, so under
  load batches form even without waiting.
- Only requests whose per-row shapes and dtypes agree share a batch; a caller
  gets rows [offset, offset + its rows) of every output (views, no copies).
- A caller that gives up (cancels, times out) is dropped before its batch runs.

`BatchStats` counts the batch sizes actually formed: plain Python, readable by
the bench (through the KServe statistics endpoint) and by metrics listeners.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np

from gateway.errors import BackendUnavailable

log = logging.getLogger(__name__)

# (model, batch size, seconds the batch ran) → None; called on the event loop, must not block
BatchListener = Callable[[str, int, float], None]
RunBatch = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]

_SMOOTHING = 0.2  # weight of the newest arrival in the moving averages


@dataclass
class BatchStats:
    """What one model's batcher (or direct calls) did. Mutated on the event loop only."""

    model: str
    sizes: Counter[int] = field(default_factory=Counter)  # batch size → batches run
    requests: int = 0
    queue_ns: int = 0  # summed over requests: arrival → batch start
    run_ns: int = 0  # summed over batches: ONNX Runtime call
    listeners: list[BatchListener] = field(default_factory=list)

    def record(self, size: int, requests: int, run_s: float, queue_s: float = 0.0) -> None:
        self.sizes[size] += 1
        self.requests += requests
        self.run_ns += int(run_s * 1e9)
        self.queue_ns += int(queue_s * 1e9)
        for listener in self.listeners:
            try:
                listener(self.model, size, run_s)
            except Exception:  # a metrics hook must never fail a batch
                log.exception("batch listener failed")

    @property
    def batches(self) -> int:
        return sum(self.sizes.values())

    def histogram(self) -> dict[int, int]:
        return dict(sorted(self.sizes.items()))


@dataclass
class _Pending:
    inputs: dict[str, np.ndarray]
    rows: int
    signature: tuple
    future: asyncio.Future
    arrived: float


class MicroBatcher:
    def __init__(
        self,
        run: RunBatch,
        *,
        executor: Executor,
        max_batch: int,
        max_delay_s: float,
        max_concurrent: int = 1,
        stats: BatchStats | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self._run_batch = run
        self._executor = executor
        self.max_batch = max_batch
        self.max_delay_s = max(0.0, max_delay_s)
        self.stats = stats or BatchStats(model="?")
        self._queue: deque[_Pending] = deque()
        self._arrived = asyncio.Event()
        self._slots = asyncio.Semaphore(max_concurrent)
        self._collector: asyncio.Task | None = None
        self._running: set[asyncio.Task] = set()
        self._mean_gap_s = math.inf
        self._overlap = 0.0  # moving average of "arrived while another request was in flight"
        self._in_flight = 0
        self._last_arrival: float | None = None
        self._closed = False

    async def submit(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Queue tensors with a leading batch dimension; return this caller's rows of every output."""
        if self._closed:
            raise BackendUnavailable("the embedded backend is closed")
        loop = asyncio.get_running_loop()
        if self._collector is None:
            self._collector = loop.create_task(self._collect())
            self._collector.add_done_callback(self._collector_done)
        now = loop.time()
        self._note_arrival(now)
        first = next(iter(inputs.values()))
        signature = tuple((name, value.dtype.str, value.shape[1:]) for name, value in sorted(inputs.items()))
        pending = _Pending(inputs, int(first.shape[0]), signature, loop.create_future(), now)
        self._queue.append(pending)
        self._arrived.set()
        self._in_flight += 1
        try:
            return await pending.future
        finally:
            self._in_flight -= 1

    async def close(self) -> None:
        self._closed = True
        tasks = [t for t in (self._collector, *self._running) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        _fail(list(self._queue), BackendUnavailable("the embedded backend closed"))
        self._queue.clear()

    # --- internals ---------------------------------------------------------

    def _collector_done(self, task: asyncio.Task) -> None:
        """Never leave callers hanging: if the collector dies, fail what is queued; the next submit restarts it."""
        self._collector = None
        if not task.cancelled() and task.exception() is not None:
            log.error("batch collector failed", exc_info=task.exception())
            _fail(list(self._queue), BackendUnavailable("the batching queue failed; retry"))
            self._queue.clear()

    def _note_arrival(self, now: float) -> None:
        if self._last_arrival is not None:
            gap = now - self._last_arrival
            if math.isinf(self._mean_gap_s):
                self._mean_gap_s = gap
            else:
                self._mean_gap_s += _SMOOTHING * (gap - self._mean_gap_s)
        self._last_arrival = now
        self._overlap += _SMOOTHING * ((1.0 if self._in_flight else 0.0) - self._overlap)

    def _expect_company(self) -> bool:
        return self.max_delay_s > 0 and self._overlap >= 0.5 and self._mean_gap_s < self.max_delay_s

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
            await self._slots.acquire()
            batch = self._take([])
            if not batch:
                self._slots.release()
                continue
            if self._expect_company():
                try:
                    batch = await self._fill(batch)
                except asyncio.CancelledError:
                    _fail(batch, BackendUnavailable("the embedded backend closed"))
                    raise
            batch = [p for p in batch if not p.future.done()]  # callers that gave up while we waited
            if not batch:
                self._slots.release()
                continue
            task = loop.create_task(self._run(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _fill(self, batch: list[_Pending]) -> list[_Pending]:
        """Add arrivals to `batch` until it is full or max_delay_s after its first request."""
        loop = asyncio.get_running_loop()
        deadline = batch[0].arrived + self.max_delay_s
        while _rows(batch) < self.max_batch and (remaining := deadline - loop.time()) > 0:
            self._arrived.clear()
            before = len(batch)
            batch = self._take(batch)
            if len(batch) == before:  # nothing more fits now: wait for the next arrival
                try:
                    await asyncio.wait_for(self._arrived.wait(), remaining)
                except asyncio.TimeoutError:
                    break
        return batch

    def _take(self, batch: list[_Pending]) -> list[_Pending]:
        """Move queued requests that fit (same signature, row budget) into `batch`; keep the rest in order."""
        skipped: list[_Pending] = []
        rows = _rows(batch)
        while self._queue:
            pending = self._queue.popleft()
            if pending.future.done():
                continue
            if not batch:
                batch.append(pending)
                rows = pending.rows
                continue
            if pending.signature != batch[0].signature or rows + pending.rows > self.max_batch:
                skipped.append(pending)
                if rows >= self.max_batch:
                    break
                continue
            batch.append(pending)
            rows += pending.rows
        self._queue.extendleft(reversed(skipped))
        return batch

    async def _run(self, batch: list[_Pending]) -> None:
        loop = asyncio.get_running_loop()
        try:
            if len(batch) == 1:
                feeds = batch[0].inputs
            else:
                feeds = {name: np.concatenate([p.inputs[name] for p in batch]) for name in batch[0].inputs}
            started = loop.time()
            clock = time.perf_counter()
            try:
                outputs = await loop.run_in_executor(self._executor, self._run_batch, feeds)
            except asyncio.CancelledError:
                _fail(batch, BackendUnavailable("the embedded backend closed"))
                raise
            except Exception as error:  # every caller in the batch gets the model's error
                _fail(batch, error)
                return
            run_s = time.perf_counter() - clock
            queue_s = sum(started - p.arrived for p in batch)
            self.stats.record(_rows(batch), len(batch), run_s, queue_s)
            offset = 0
            for pending in batch:
                end = offset + pending.rows
                if not pending.future.done():
                    pending.future.set_result({name: value[offset:end] for name, value in outputs.items()})
                offset = end
        finally:
            self._slots.release()


def _fail(batch: list[_Pending], error: BaseException) -> None:
    for pending in batch:
        if not pending.future.done():
            pending.future.set_exception(error)


def _rows(batch: list[_Pending]) -> int:
    return sum(p.rows for p in batch)
