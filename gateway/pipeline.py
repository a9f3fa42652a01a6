"""One image → one analysis: decode → crop/resize/normalize → classifier →
(U-Net ‖ Mask R-CNN) → results mapped back to the original pixels.

CPU-bound numpy work runs in a thread pool so the event loop only schedules.
Each hop to the pool costs a thread wake-up, so the work is grouped: decode,
brain crop and the first model's tensor in one hop, and a model whose input
size matches one already prepared reuses it.

A gated request (the default) runs the classifier first and the U-Net and
Mask R-CNN only on a judged slice with p(tumor) >= the decision gate. An
ungated request needs nothing from the classifier, so all three start at once,
the Mask R-CNN (the longest) first: its latency is the longest chain, not the
sum. Either way the answer is decided once, by gateway.decision, from the
scope checks and everything the models returned.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np

from gateway.backends.base import Backend
from gateway.contract import ModelSpec
from gateway.config import GatewayConfig
from gateway.decision import (
    Decision,
    DecisionParameters,
    Evidence,
    Scope,
    assess_scope,
    decide,
    runs_localization,
    tumor_probability,
)
from gateway.errors import DeadlineExceeded, InvalidImage
from gateway.postprocessing import (
    InstanceResult,
    SegmentationResult,
    instances_from_maskrcnn,
    segmentation_from_unet,
)
from gateway.preprocessing import (
    CropBox,
    DecodedImage,
    PreparedImage,
    decode_frames,
    decode_image,
    find_brain_box,
    prepare,
    unit_gray_and_colour,
)
from gateway.scope import ScopeFlag, check_image

SCOPE_OUTPUT = "in_scope"


@dataclass(frozen=True)
class AnalysisOptions:
    segment: bool = True
    detect: bool = True
    gate: bool = True  # run U-Net / Mask R-CNN only on a judged slice with p(tumor) >= the decision gate


@dataclass(frozen=True)
class Analysis:
    label: str
    probabilities: dict[str, float]
    tumor_probability: float
    tumor_detected: bool
    image_height: int
    image_width: int
    segmentation: SegmentationResult | None
    instances: list[InstanceResult]
    segmentation_ran: bool
    detection_ran: bool
    scope: Scope
    timings_ms: dict[str, float] = field(default_factory=dict)


class _Stopwatch:
    def __init__(self) -> None:
        self.timings_ms: dict[str, float] = {}

    def record(self, stage: str, started: float) -> None:
        self.timings_ms[stage] = round((time.perf_counter() - started) * 1000.0, 3)


class _Inputs:
    """One slice's prepared tensors, one per model input size, all cut from the same brain crop."""

    def __init__(self, decoded: DecodedImage, crop: CropBox) -> None:
        self.decoded, self.crop = decoded, crop
        self.image_flag: ScopeFlag | None = None
        self._by_size: dict[int, PreparedImage] = {}

    def cached(self, size: int) -> PreparedImage | None:
        return self._by_size.get(size)

    def get(self, size: int) -> PreparedImage:
        prepared = self._by_size.get(size)
        if prepared is None:
            prepared = self._by_size[size] = prepare(self.decoded.pixels, size, crop=self.crop)
        return prepared

    def prepare_all(self, sizes: list[int]) -> None:
        for size in sizes:
            self.get(size)

    @classmethod
    def first(cls, decoded: DecodedImage, size: int) -> _Inputs:
        """Brain crop, the image-level scope checks, and the tensor of the first model to run."""
        inputs = cls(decoded, find_brain_box(decoded.pixels))
        inputs.image_flag = check_image(decoded.pixels, decoded.colour_fraction)
        inputs.get(size)
        return inputs


class Pipeline:
    def __init__(self, backend: Backend, config: GatewayConfig, executor: ThreadPoolExecutor) -> None:
        self.backend = backend
        self.config = config
        self._executor = executor

    @functools.cached_property
    def decision(self) -> DecisionParameters:
        """The decision's operating points; read once the backend has loaded the model specs."""
        return decision_parameters(self.backend.specs["classifier"], self.config)

    @property
    def model_versions(self) -> dict[str, str]:
        return {spec.name: spec.version for spec in self.backend.specs.values()}

    async def decode(self, image: bytes | np.ndarray, *, all_frames: bool = False) -> list[DecodedImage]:
        """Decode off the event loop; one image, or every frame of a multi-frame DICOM."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, partial(self._decode, image, all_frames=all_frames))

    async def analyze(
        self,
        image: bytes | np.ndarray,
        options: AnalysisOptions = AnalysisOptions(),
        *,
        timeout_s: float | None = None,
    ) -> Analysis:
        loop = asyncio.get_running_loop()
        size = self.backend.specs[_first_model(options)].input_size
        timings: dict[str, float] = {}

        def decode_and_prepare() -> _Inputs:
            started = time.perf_counter()
            (decoded,) = self._decode(image, all_frames=False)
            timings["decode"] = (time.perf_counter() - started) * 1000.0
            return _Inputs.first(decoded, size)

        started = time.perf_counter()
        inputs = await loop.run_in_executor(self._executor, decode_and_prepare)
        front_ms = (time.perf_counter() - started) * 1000.0
        remaining = None if timeout_s is None else timeout_s - front_ms / 1000.0
        return await self._analyze(
            inputs, options, timeout_s=remaining, decode_ms=timings["decode"], preprocess_ms=front_ms - timings["decode"]
        )

    async def analyze_decoded(
        self,
        decoded: DecodedImage,
        options: AnalysisOptions = AnalysisOptions(),
        *,
        timeout_s: float | None = None,
        decode_ms: float = 0.0,
    ) -> Analysis:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        size = self.backend.specs[_first_model(options)].input_size
        inputs = await loop.run_in_executor(self._executor, _Inputs.first, decoded, size)
        preprocess_ms = (time.perf_counter() - started) * 1000.0
        remaining = None if timeout_s is None else timeout_s - preprocess_ms / 1000.0
        return await self._analyze(inputs, options, timeout_s=remaining, decode_ms=decode_ms, preprocess_ms=preprocess_ms)

    async def _analyze(
        self,
        inputs: _Inputs,
        options: AnalysisOptions,
        *,
        timeout_s: float | None,
        decode_ms: float,
        preprocess_ms: float,
    ) -> Analysis:
        loop = asyncio.get_running_loop()
        deadline = None if timeout_s is None else loop.time() + timeout_s
        watch = _Stopwatch()
        watch.timings_ms["decode"] = round(decode_ms, 3)
        watch.timings_ms["preprocess"] = round(preprocess_ms, 3)
        total_started = time.perf_counter() - (decode_ms + preprocess_ms) / 1000.0
        decoded = inputs.decoded
        if options.gate:
            by_label, in_scope = await self._classify(inputs, deadline, watch)
            scope = assess_scope(in_scope, inputs.image_flag, self.decision)
            localize = runs_localization(by_label, scope, self.decision)
            segment, detect = localize and options.segment, localize and options.detect
            # Both tensors in one hop, the Mask R-CNN's first, so that it reaches the backend first
            # and keeps every core (the embedded backend's ThreadBudget); the U-Net runs beside it.
            sizes = [self.backend.specs[m].input_size for m, on in (("maskrcnn", detect), ("unet", segment)) if on]
            if sizes:
                await loop.run_in_executor(self._executor, inputs.prepare_all, sizes)
            instances, (segmentation, mask_fraction) = await _all(
                self._detect(inputs, deadline, watch) if detect else _value([]),
                self._segment(inputs, deadline, watch) if segment else _value((None, None)),
            )
        else:
            segment, detect = options.segment, options.detect
            # The tasks start in this order: the Mask R-CNN, whose tensor is already prepared, first.
            instances, (by_label, in_scope), (segmentation, mask_fraction) = await _all(
                self._detect(inputs, deadline, watch) if detect else _value([]),
                self._classify(inputs, deadline, watch),
                self._segment(inputs, deadline, watch) if segment else _value((None, None)),
            )
            scope = assess_scope(in_scope, inputs.image_flag, self.decision)
        evidence = Evidence(
            mask_fraction=mask_fraction, max_instance_score=max((i.score for i in instances), default=None)
        )
        decision: Decision = decide(
            by_label, scope, evidence, self.decision, localization_asked=options.segment or options.detect
        )
        if options.gate and not decision.tumor_detected:
            # Gated answers show localization only with a tumor finding (a sub-threshold mask is no finding).
            segmentation, instances = None, []
        watch.record("total", total_started)
        analysis = Analysis(
            label=decision.label,
            probabilities=by_label,
            tumor_probability=tumor_probability(by_label),
            tumor_detected=decision.tumor_detected,
            image_height=int(decoded.pixels.shape[0]),
            image_width=int(decoded.pixels.shape[1]),
            segmentation=segmentation,
            instances=instances,
            segmentation_ran=segment,
            detection_ran=detect,
            scope=decision.scope,
            timings_ms=watch.timings_ms,
        )
        return analysis

    def _decode(self, image: bytes | np.ndarray, *, all_frames: bool) -> list[DecodedImage]:
        max_side, max_pixels = self.config.max_image_side, self.config.max_request_pixels
        if isinstance(image, np.ndarray):
            pixels, colour = unit_gray_and_colour(image, max_side=max_side)
            return [DecodedImage(pixels=pixels, colour_fraction=colour)]
        if isinstance(image, (bytes, bytearray, memoryview)):
            if all_frames:
                return decode_frames(bytes(image), max_side=max_side, max_pixels=max_pixels)
            return [decode_image(bytes(image), max_side=max_side, max_pixels=max_pixels)]
        raise InvalidImage(f"unsupported image type {type(image).__name__}")

    async def _classify(
        self, inputs: _Inputs, deadline: float | None, watch: _Stopwatch
    ) -> tuple[dict[str, float], float | None]:
        """Class probabilities by label, and the in_scope probability (None when the model has no such output)."""
        loop = asyncio.get_running_loop()
        spec = self.backend.specs["classifier"]
        prepared = await self._prepared(inputs, spec.input_size)
        started = time.perf_counter()
        outputs = await self.backend.infer(
            "classifier", {"image": prepared.tensor[None, :, :, None]}, timeout_s=_remaining(deadline, loop, "classifier")
        )
        watch.record("classifier", started)
        probabilities = outputs["probabilities"][0].astype(np.float64)
        in_scope = outputs.get(SCOPE_OUTPUT)
        by_label = {label: float(p) for label, p in zip(spec.labels, probabilities)}
        return by_label, None if in_scope is None else float(np.reshape(in_scope[0], -1)[0])

    async def _prepared(self, inputs: _Inputs, size: int) -> PreparedImage:
        """The tensor for `size`: from the cache, else prepared in the pool."""
        return inputs.cached(size) or await asyncio.get_running_loop().run_in_executor(self._executor, inputs.get, size)

    async def _segment(
        self, inputs: _Inputs, deadline: float | None, watch: _Stopwatch
    ) -> tuple[SegmentationResult | None, float]:
        """The mask in original pixels, and the share of the U-Net's grid it covers (the decision's evidence)."""
        loop = asyncio.get_running_loop()
        spec = self.backend.specs["unet"]
        decoded = inputs.decoded
        prepared = await self._prepared(inputs, spec.input_size)
        started = time.perf_counter()
        outputs = await self.backend.infer(
            "unet", {"image": prepared.tensor[None, :, :, None]}, timeout_s=_remaining(deadline, loop, "unet")
        )
        watch.record("unet", started)
        started = time.perf_counter()
        probabilities = outputs["mask"][0, :, :, 0]
        threshold = self.config.mask_threshold

        def postprocess() -> tuple[SegmentationResult | None, float]:
            fraction = float(np.count_nonzero(probabilities >= threshold)) / probabilities.size
            mask = segmentation_from_unet(probabilities, prepared, threshold=threshold, spacing=decoded.pixel_spacing_mm)
            return mask, fraction

        result = await loop.run_in_executor(self._executor, postprocess)
        watch.record("unet_postprocess", started)
        return result

    async def _detect(self, inputs: _Inputs, deadline: float | None, watch: _Stopwatch) -> list[InstanceResult]:
        loop = asyncio.get_running_loop()
        spec = self.backend.specs["maskrcnn"]
        size = spec.input_size
        decoded = inputs.decoded
        prepared = await self._prepared(inputs, size)
        started = time.perf_counter()
        outputs = await self.backend.infer(
            "maskrcnn", {"image": prepared.tensor[None]}, timeout_s=_remaining(deadline, loop, "maskrcnn")
        )
        watch.record("maskrcnn", started)
        started = time.perf_counter()
        result = await loop.run_in_executor(
            self._executor,
            lambda: instances_from_maskrcnn(
                outputs["boxes"],
                outputs["scores"],
                outputs["masks"],
                prepared,
                grid_size=size,
                score_threshold=self.config.detection_threshold,
                mask_threshold=self.config.mask_threshold,
                spacing=decoded.pixel_spacing_mm,
            ),
        )
        watch.record("maskrcnn_postprocess", started)
        return result


def _first_model(options: AnalysisOptions) -> str:
    """The model whose tensor the front hop prepares: the one that starts first."""
    return "maskrcnn" if options.detect and not options.gate else "classifier"


def decision_parameters(classifier: ModelSpec, config: GatewayConfig) -> DecisionParameters:
    """The classifier's config.pbtxt parameters, overridden by non-None BRAINSCAN_DECISION_* settings."""
    overrides = {
        "decision_gate": config.decision_gate,
        "decision_alone": config.decision_alone,
        "decision_strong": config.decision_strong,
        "decision_min_mask_fraction": config.decision_min_mask_fraction,
        "scope_threshold": config.scope_threshold,
    }
    return DecisionParameters.from_parameters(
        classifier.parameters,
        overrides,
        detection_threshold=config.detection_threshold,
        learned_scope=any(t.name == SCOPE_OUTPUT for t in classifier.outputs),
    )


async def _value(value):
    return value


async def _all(*steps: Awaitable[Any]) -> list[Any]:
    """Run the steps concurrently; when one fails, cancel the rest (no model runs for a lost request)."""
    tasks = [asyncio.ensure_future(step) for step in steps]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        raise


def _remaining(deadline: float | None, loop: asyncio.AbstractEventLoop, stage: str) -> float | None:
    if deadline is None:
        return None
    remaining = deadline - loop.time()
    if remaining <= 0:
        raise DeadlineExceeded(f"deadline exceeded before the {stage} stage")
    return remaining
