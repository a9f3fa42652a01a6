"""The floor: the three models called straight through ONNX Runtime, one slice at a
time, in this process, on the embedded backend's own sessions.

Two variants, both sequential (concurrency 1):
- `models`: only the three session calls on tensors prepared beforehand;
- `models+pre/post`: the same slice's whole in-process chain (decode, brain
  crop, resize/normalize for each model, the calls, masks back to the original
  pixels and PNG-encoded), so the gateway's overhead splits into the
  image work every server must do and what serving adds (gRPC, asyncio, batching).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from gateway.backends.embedded import EmbeddedBackend
from gateway.config import GatewayConfig
from gateway.pipeline import unet_min_component_px
from gateway.postprocessing import drop_small_components, instances_from_maskrcnn, segmentation_from_unet
from gateway.preprocessing import decode_image, find_brain_box, prepare

Feeds = dict[str, dict[str, np.ndarray]]  # role → inputs


def open_backend(repository: Path, threads: int) -> EmbeddedBackend:
    """The embedded backend's sessions, exactly as the gateway opens them (batching off: called directly)."""
    backend = EmbeddedBackend(repository, threads=threads, batch_max_delay_ms=0)
    asyncio.run(backend.start())
    return backend


def model_inputs(backend: EmbeddedBackend, data: bytes) -> Feeds:
    pixels = decode_image(data).pixels
    crop = find_brain_box(pixels)
    feeds: Feeds = {}
    for role, spec in backend.specs.items():
        tensor = prepare(pixels, spec.input_size, crop=crop).tensor
        feeds[role] = {"image": tensor[None, :, :, None] if spec.max_batch_size > 0 else tensor[None]}
    return feeds


def run_models(backend: EmbeddedBackend, feeds: Feeds) -> None:
    for role in ("classifier", "unet", "maskrcnn"):
        backend.run_session(role, feeds[role])


def run_inprocess(backend: EmbeddedBackend, data: bytes, config: GatewayConfig) -> None:
    """One slice through decode → preprocess → all three models → postprocess, synchronously."""
    decoded = decode_image(data, max_side=config.max_image_side)
    crop = find_brain_box(decoded.pixels)
    specs = backend.specs
    cls = prepare(decoded.pixels, specs["classifier"].input_size, crop=crop)
    backend.run_session("classifier", {"image": cls.tensor[None, :, :, None]})
    seg = prepare(decoded.pixels, specs["unet"].input_size, crop=crop)
    mask = backend.run_session("unet", {"image": seg.tensor[None, :, :, None]})["mask"]
    probabilities = drop_small_components(mask[0, :, :, 0], threshold=config.mask_threshold,
                                          min_px=unet_min_component_px(specs["unet"], config))
    segmentation_from_unet(probabilities, seg, threshold=config.mask_threshold, spacing=decoded.pixel_spacing_mm)
    size = specs["maskrcnn"].input_size
    det = prepare(decoded.pixels, size, crop=crop)
    out = backend.run_session("maskrcnn", {"image": det.tensor[None]})
    instances_from_maskrcnn(
        out["boxes"], out["scores"], out["masks"], det, grid_size=size,
        score_threshold=config.detection_threshold, mask_threshold=config.mask_threshold,
        spacing=decoded.pixel_spacing_mm,
    )


def timed(step: Callable[[int], None], items: int, *, warmup_s: float, duration_s: float) -> dict[str, float]:
    """Call step(item) back to back: warm-up, then a window of duration_s; images/s and latency."""
    item = 0
    end = time.perf_counter() + warmup_s
    while time.perf_counter() < end:
        step(item % items)
        item += 1
    latencies = []
    started = time.perf_counter()
    end = started + duration_s
    while time.perf_counter() < end:
        sent = time.perf_counter()
        step(item % items)
        latencies.append((time.perf_counter() - sent) * 1000.0)
        item += 1
    elapsed = time.perf_counter() - started
    lat = np.asarray(latencies)
    return {
        "completed": len(latencies),
        "duration_s": round(elapsed, 3),
        "throughput_per_s": round(len(latencies) / elapsed, 3),
        "p50_ms": round(float(np.percentile(lat, 50)), 3),
        "p90_ms": round(float(np.percentile(lat, 90)), 3),
        "p99_ms": round(float(np.percentile(lat, 99)), 3),
        "mean_ms": round(float(lat.mean()), 3),
    }


def measure_floor(
    repository: Path, images: list[bytes], *, threads: int, warmup_s: float, duration_s: float,
    models_only: bool = False,
) -> dict[str, dict[str, float]]:
    backend = open_backend(repository, threads)
    try:
        feeds = [model_inputs(backend, data) for data in images]
        config = GatewayConfig()
        results = {
            "models": timed(lambda i: run_models(backend, feeds[i]), len(feeds), warmup_s=warmup_s, duration_s=duration_s),
        }
        if not models_only:
            results["models+pre/post"] = timed(
                lambda i: run_inprocess(backend, images[i], config), len(images), warmup_s=warmup_s, duration_s=duration_s
            )
        return results
    finally:
        asyncio.run(backend.close())
