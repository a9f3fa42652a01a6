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
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np

from gateway.backends.base import Backend
from gateway.contract import ModelSpec
from gateway.errors import ContractError
from gateway.config import GatewayConfig
from gateway.decision import (
    Decision,
    DecisionParameters,
    Evidence,
    Scope,
    assess_scope,
    decide,
    passes_gate,
    tumor_probability,
)
from gateway.image_header import ImageHeader
from gateway.postprocessing import (
    InstanceResult,
    SegmentationResult,
    drop_small_components,
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
from gateway.request_clock import Stopwatch, time_left
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

    @functools.cached_property
    def min_component_px(self) -> int:
        """U-Net mask regions under this many grid pixels are dropped (gateway.postprocessing.drop_small_components)."""
        return unet_min_component_px(self.backend.specs["unet"], self.config)

    @property
    def model_versions(self) -> dict[str, str]:
        return {spec.name: spec.version for spec in self.backend.specs.values()}

    def decode_step(self, image: bytes | np.ndarray, header: ImageHeader) -> Callable[[], DecodedImage]:
        """The decode step of a one-image request (Analyze, KServe), with the header its admission read
        (gateway.admission: the one place the image's kind is worked out): runs in the front hop."""
        return partial(self._decode_one, image, header)

    async def decode_frames(
        self, image: bytes | np.ndarray, header: ImageHeader, stopwatch: Stopwatch
    ) -> list[DecodedImage]:
        """Every frame of a multi-frame DICOM, else the one image (AnalyzeStream, AnalyzeSeries), decoded off
        the event loop; each frame then goes to `run` as `frame_step(frame)` with a `stopwatch.fork()`."""
        max_side, max_pixels = self.config.max_image_side, self.config.max_request_pixels

        def decode() -> list[DecodedImage]:
            with stopwatch.stage("decode"):
                if header.format == "array":
                    return [self._decode_one(image, header)]
                return decode_frames(image, header=header, max_side=max_side, max_pixels=max_pixels)

        return await asyncio.get_running_loop().run_in_executor(self._executor, decode)

    async def run(
        self,
        decode: Callable[[], DecodedImage],
        options: AnalysisOptions,
        *,
        deadline: float | None,
        stopwatch: Stopwatch,
    ) -> Analysis:
        """The one request path. `decode` runs in the front hop with the brain crop and the first model's
        tensor; `deadline` (gateway.request_clock) goes unchanged to every backend call; every stage
        records into `stopwatch`, started when the request arrived."""
        loop = asyncio.get_running_loop()
        size = self.backend.specs[_first_model(options)].input_size

        def front() -> _Inputs:
            with stopwatch.stage("decode"):
                decoded = decode()
            with stopwatch.stage("preprocess"):
                return _Inputs.first(decoded, size)

        inputs = await loop.run_in_executor(self._executor, front)
        decoded = inputs.decoded
        if options.gate:
            by_label, in_scope = await self._classify(inputs, deadline, stopwatch)
            scope = assess_scope(in_scope, inputs.image_flag, self.decision)
            gate_passed = passes_gate(by_label, scope, self.decision)
            segment, detect = gate_passed and options.segment, gate_passed and options.detect
            # Both tensors in one hop, the Mask R-CNN's first, so that it reaches the backend first
            # and keeps every core (the embedded backend's ThreadBudget); the U-Net runs beside it.
            sizes = [self.backend.specs[m].input_size for m, on in (("maskrcnn", detect), ("unet", segment)) if on]
            if sizes:
                await loop.run_in_executor(self._executor, inputs.prepare_all, sizes)
            instances, (segmentation, mask_fraction) = await _all(
                self._detect(inputs, deadline, stopwatch) if detect else _value([]),
                self._segment(inputs, deadline, stopwatch) if segment else _value((None, None)),
            )
        else:
            segment, detect = options.segment, options.detect
            # The tasks start in this order: the Mask R-CNN, whose tensor is already prepared, first.
            instances, (by_label, in_scope), (segmentation, mask_fraction) = await _all(
                self._detect(inputs, deadline, stopwatch) if detect else _value([]),
                self._classify(inputs, deadline, stopwatch),
                self._segment(inputs, deadline, stopwatch) if segment else _value((None, None)),
            )
            scope = assess_scope(in_scope, inputs.image_flag, self.decision)
            gate_passed = passes_gate(by_label, scope, self.decision)
        evidence = Evidence(
            mask_fraction=mask_fraction, max_instance_score=max((i.score for i in instances), default=None)
        )
        decision: Decision = decide(
            by_label,
            scope,
            evidence,
            self.decision,
            localization_asked=options.segment or options.detect,
            gate_passed=gate_passed,
        )
        if options.gate and not decision.tumor_detected:
            # Gated answers show localization only with a tumor finding (a sub-threshold mask is no finding).
            segmentation, instances = None, []
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
            timings_ms=stopwatch.stop(),
        )
        return analysis

    def _decode_one(self, image: bytes | np.ndarray, header: ImageHeader) -> DecodedImage:
        max_side, max_pixels = self.config.max_image_side, self.config.max_request_pixels
        if header.format == "array":
            pixels, colour = unit_gray_and_colour(image, max_side=max_side)
            return DecodedImage(pixels=pixels, colour_fraction=colour)
        return decode_image(image, header=header, max_side=max_side, max_pixels=max_pixels)

    async def _classify(
        self, inputs: _Inputs, deadline: float | None, stopwatch: Stopwatch
    ) -> tuple[dict[str, float], float | None]:
        """Class probabilities by label, and the in_scope probability (None when the model has no such output)."""
        loop = asyncio.get_running_loop()
        spec = self.backend.specs["classifier"]
        prepared = await self._prepared(inputs, spec.input_size)
        time_left(deadline, "classifier")
        with stopwatch.stage("classifier"):
            feed = {"image": prepared.tensor[None, :, :, None]}
            outputs = await self.backend.infer("classifier", feed, deadline=deadline)
        probabilities = outputs["probabilities"][0].astype(np.float64)
        in_scope = outputs.get(SCOPE_OUTPUT)
        by_label = {label: float(p) for label, p in zip(spec.labels, probabilities)}
        return by_label, None if in_scope is None else float(np.reshape(in_scope[0], -1)[0])

    async def _prepared(self, inputs: _Inputs, size: int) -> PreparedImage:
        """The tensor for `size`: from the cache, else prepared in the pool."""
        return inputs.cached(size) or await asyncio.get_running_loop().run_in_executor(self._executor, inputs.get, size)

    async def _segment(
        self, inputs: _Inputs, deadline: float | None, stopwatch: Stopwatch
    ) -> tuple[SegmentationResult | None, float]:
        """The mask in original pixels, and the share of the U-Net's grid it covers (the decision's evidence)."""
        loop = asyncio.get_running_loop()
        spec = self.backend.specs["unet"]
        decoded = inputs.decoded
        prepared = await self._prepared(inputs, spec.input_size)
        time_left(deadline, "unet")
        with stopwatch.stage("unet"):
            outputs = await self.backend.infer("unet", {"image": prepared.tensor[None, :, :, None]}, deadline=deadline)
        threshold, min_px = self.config.mask_threshold, self.min_component_px

        def postprocess() -> tuple[SegmentationResult | None, float]:
            probabilities = drop_small_components(outputs["mask"][0, :, :, 0], threshold=threshold, min_px=min_px)
            fraction = float(np.count_nonzero(probabilities >= threshold)) / probabilities.size
            mask = segmentation_from_unet(probabilities, prepared, threshold=threshold, spacing=decoded.pixel_spacing_mm)
            return mask, fraction

        with stopwatch.stage("unet_postprocess"):
            return await loop.run_in_executor(self._executor, postprocess)

    async def _detect(self, inputs: _Inputs, deadline: float | None, stopwatch: Stopwatch) -> list[InstanceResult]:
        loop = asyncio.get_running_loop()
        spec = self.backend.specs["maskrcnn"]
        size = spec.input_size
        decoded = inputs.decoded
        prepared = await self._prepared(inputs, size)
        time_left(deadline, "maskrcnn")
        with stopwatch.stage("maskrcnn"):
            outputs = await self.backend.infer("maskrcnn", {"image": prepared.tensor[None]}, deadline=deadline)
        postprocess = partial(
            instances_from_maskrcnn,
            outputs["boxes"],
            outputs["scores"],
            outputs["masks"],
            prepared,
            grid_size=size,
            score_threshold=self.config.detection_threshold,
            mask_threshold=self.config.mask_threshold,
            spacing=decoded.pixel_spacing_mm,
        )
        with stopwatch.stage("maskrcnn_postprocess"):
            return await loop.run_in_executor(self._executor, postprocess)


def frame_step(decoded: DecodedImage) -> Callable[[], DecodedImage]:
    """The decode step of one frame already decoded with its file (`Pipeline.decode_frames`)."""
    return lambda: decoded


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


def unet_min_component_px(unet: ModelSpec, config: GatewayConfig) -> int:
    """BRAINSCAN_UNET_MIN_COMPONENT_PX when set, else the U-Net's config.pbtxt parameter, else 0 (keep every region)."""
    if config.unet_min_component_px is not None:
        value: object = config.unet_min_component_px
    else:
        value = unet.parameters.get("min_component_px") or 0
    try:
        min_px = int(value)  # type: ignore[call-overload]
    except ValueError:
        raise ContractError(f"unet parameter min_component_px={value!r} is not an integer") from None
    if min_px < 0:
        raise ContractError(f"unet min_component_px {min_px} is negative")
    return min_px


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
