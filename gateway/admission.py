"""The gateway's one admission limit, shared by every API it serves (BrainScan, and KServe when on).

First the request alone: its size, read from the header (PNG IHDR, JPEG SOF,
DICOM Rows/Columns/NumberOfFrames, a raw array's shape) before any pixel is
decoded, must fit the per-request limits (else INVALID_ARGUMENT: retrying
cannot help). Then it is admitted when an in-flight slot is free AND its decoded pixels
(all frames, read from the header before decoding) fit in the budget across
requests in flight. Waiters are served first come, first served, so a large
request is not starved by a stream of small ones. The wait lasts up to just
before the caller's deadline, so the caller learns why (RESOURCE_EXHAUSTED)
instead of seeing a bare DEADLINE_EXCEEDED; a call without a deadline is
refused at once when it cannot be admitted: never an unbounded queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator

import numpy as np

from gateway.config import GatewayConfig
from gateway.errors import InvalidImage, Overloaded
from gateway.image_header import ImageHeader, check_pixel_limit, looks_like_dicom, read_header
from gateway.preprocessing import check_size


class Admission:
    def __init__(
        self, *, max_in_flight: int, max_pixels: int, max_request_pixels: int | None = None, max_side: int = 8192
    ) -> None:
        if max_in_flight < 1 or max_pixels < 1:
            raise ValueError("max_in_flight and max_pixels must be positive")
        self.max_in_flight = max_in_flight
        self.max_pixels = max_pixels
        self.max_request_pixels = max_pixels if max_request_pixels is None else max_request_pixels
        self.max_side = max_side
        self.in_flight = 0
        self.pixels = 0
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    @classmethod
    def from_config(cls, config: GatewayConfig) -> Admission:
        return cls(
            max_in_flight=config.max_in_flight,
            max_pixels=config.max_inflight_pixels,
            max_request_pixels=config.max_request_pixels,
            max_side=config.max_image_side,
        )

    async def measure(self, image: bytes | np.ndarray) -> ImageHeader:
        """The request's decoded size from its header, checked against the per-request limits."""
        if isinstance(image, np.ndarray):
            header = ImageHeader("array", width=int(image.shape[1]), height=int(image.shape[0]))
        elif isinstance(image, bytes) and looks_like_dicom(image):
            header = await asyncio.to_thread(read_header, image)  # a full parse: off the event loop
        elif isinstance(image, bytes):
            header = read_header(image)  # PNG / JPEG: a few byte reads
        else:
            raise InvalidImage(f"unsupported image type {type(image).__name__}")
        check_size((header.height, header.width), self.max_side)
        check_pixel_limit(header, self.max_request_pixels)
        return header

    @contextlib.asynccontextmanager
    async def admit_image(self, image: bytes | np.ndarray, deadline: float | None) -> AsyncIterator[ImageHeader]:
        """measure(), then admit() with the pixels it found."""
        header = await self.measure(image)
        async with self.admit(header.pixels, deadline):
            yield header

    @contextlib.asynccontextmanager
    async def admit(self, pixels: int, deadline: float | None) -> AsyncIterator[None]:
        """Hold one slot and `pixels` of the budget for the body of the `async with`; `deadline`:
        the request's (gateway.request_clock), None for none.

        `pixels` above the whole budget is clamped to it (the per-request limit, checked
        before, is what refuses such a request); such a request then runs alone.
        """
        pixels = min(max(0, pixels), self.max_pixels)
        await self._acquire(pixels, deadline)
        try:
            yield
        finally:
            self.in_flight -= 1
            self.pixels -= pixels
            self._wake()

    def _fits(self, pixels: int) -> bool:
        return self.in_flight < self.max_in_flight and self.pixels + pixels <= self.max_pixels

    async def _acquire(self, pixels: int, deadline: float | None) -> None:
        if not self._waiters and self._fits(pixels):
            self._take(pixels)
            return
        left_s = 0.0 if deadline is None else max(0.0, deadline - time.monotonic())
        wait_s = max(0.0, left_s - min(0.25, 0.2 * left_s))
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (pixels, waiter)
        self._waiters.append(entry)
        try:
            await asyncio.wait_for(asyncio.shield(waiter), timeout=wait_s)
        except (asyncio.TimeoutError, asyncio.CancelledError) as exc:
            if waiter.done() and not waiter.cancelled():  # admitted just as the wait ended: give it back
                self.in_flight -= 1
                self.pixels -= pixels
            else:
                waiter.cancel()
                with contextlib.suppress(ValueError):
                    self._waiters.remove(entry)
            self._wake()
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise self._refusal(pixels) from None

    def _take(self, pixels: int) -> None:
        self.in_flight += 1
        self.pixels += pixels

    def _wake(self) -> None:
        while self._waiters and self._fits(self._waiters[0][0]):
            pixels, waiter = self._waiters.popleft()
            if not waiter.done():
                self._take(pixels)
                waiter.set_result(None)

    def _refusal(self, pixels: int) -> Overloaded:
        if self.in_flight >= self.max_in_flight:
            return Overloaded(f"the gateway is at its limit of {self.max_in_flight} requests in flight; retry later")
        return Overloaded(
            f"the gateway's decoded-pixel budget for requests in flight ({self.max_pixels} pixels, "
            f"BRAINSCAN_MAX_INFLIGHT_PIXELS) cannot take this request's {pixels} now; retry later"
        )
