"""One request's clock, started by the servicer when the request arrives: its
deadline (one absolute time, passed unchanged down to the backend) and the
stopwatch every stage records into."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from gateway.errors import DeadlineExceeded


def deadline_after(time_remaining: float | None) -> float | None:
    """The absolute deadline, on time.monotonic() (the event loop's clock), of a call with
    `time_remaining` seconds left; None: no deadline."""
    return None if time_remaining is None else time.monotonic() + time_remaining


def time_left(deadline: float | None, stage: str) -> float | None:
    """Seconds left before `deadline` (None: no deadline); DeadlineExceeded when none are."""
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise DeadlineExceeded(f"deadline exceeded before the {stage} stage")
    return left


class Stopwatch:
    """Milliseconds per stage, and `total` since the request arrived."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.timings_ms: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the body as `name`, added to what `name` took before (a frame's decode: its file's, then its own)."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.timings_ms[name] = round(self.timings_ms.get(name, 0.0) + _ms_since(started), 3)

    def stop(self) -> dict[str, float]:
        self.timings_ms["total"] = _ms_since(self.started)
        return dict(self.timings_ms)

    def fork(self) -> Stopwatch:
        """One frame's stopwatch: the request's start and the stages timed so far (its decode)."""
        frame = Stopwatch()
        frame.started, frame.timings_ms = self.started, dict(self.timings_ms)
        return frame


def _ms_since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000.0, 3)
