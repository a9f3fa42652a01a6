"""gRPC servicer: proto ↔ domain only. Errors become statuses through gateway.errors."""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator

import grpc
import numpy as np

from brainscan_proto.v1 import brainscan_pb2 as pb
from brainscan_proto.v1 import brainscan_pb2_grpc as pb_grpc
from gateway.admission import Admission
from gateway.observability import Metrics, request_id_var
from gateway.errors import BrainscanError, InvalidImage
from gateway.status_codes import status_code_for
from gateway.pipeline import Analysis, AnalysisOptions, Pipeline, frame_step
from gateway.postprocessing import MaskRegion
from gateway.preprocessing import DEFAULT_MAX_SIDE, check_size
from gateway.request_clock import Stopwatch, deadline_after
from gateway.contract import DISCLAIMER
from gateway.decision import Scope
from gateway.series import Skipped
from gateway.series_analysis import SeriesAnalyzer, SeriesOutcome

log = logging.getLogger("brainscan.gateway")

_RAW_DTYPES = {"uint8", "uint16", "int16", "float32", "float64"}


class BrainScanService(pb_grpc.BrainScanServicer):
    def __init__(self, pipeline: Pipeline, *, admission: Admission, metrics: Metrics | None = None) -> None:
        self.pipeline = pipeline
        self.metrics = metrics
        self.admission = admission  # shared with the KServe front: one limit for the whole gateway

    async def Analyze(self, request: pb.AnalyzeRequest, context: grpc.aio.ServicerContext) -> pb.AnalyzeResponse:
        try:
            return await self._analyze(request, context)
        except BrainscanError as error:
            await context.abort(status_code_for(error), str(error))
        except Exception:
            log.exception("internal error in Analyze")
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error (request id {request_id_var.get()})")
        raise AssertionError("unreachable")  # context.abort always raises

    async def AnalyzeStream(
        self, request_iterator: AsyncIterator[pb.AnalyzeRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.AnalyzeResponse]:
        async for request in request_iterator:
            stopwatch, deadline = Stopwatch(), deadline_after(context.time_remaining())
            try:
                image, options = self._image(request), options_from_request(request)
                # Admitted for all its frames before any is decoded; the decoded frames live until the last is done.
                async with self.admission.admit_image(image, deadline) as header:
                    frames = await self.pipeline.decode_frames(image, header, stopwatch)
                    for index, decoded in enumerate(frames):
                        analysis = await self.pipeline.run(
                            frame_step(decoded), options, deadline=deadline, stopwatch=stopwatch.fork()
                        )
                        response = self._respond(analysis, request.image_id)
                        response.frame = index
                        yield response
            except BrainscanError as error:
                yield pb.AnalyzeResponse(
                    image_id=request.image_id,
                    error=pb.Error(code=status_code_for(error).name, message=str(error)),
                )
            except Exception:
                log.exception("internal error in AnalyzeStream")
                yield pb.AnalyzeResponse(
                    image_id=request.image_id,
                    error=pb.Error(code="INTERNAL", message=f"internal error (request id {request_id_var.get()})"),
                )

    async def AnalyzeSeries(
        self, request_iterator: AsyncIterator[pb.AnalyzeSeriesRequest], context: grpc.aio.ServicerContext
    ) -> pb.AnalyzeSeriesResponse:
        try:
            return await self._analyze_series(request_iterator, context)
        except grpc.aio.AbortError:  # the interceptor refused a malformed message in the stream
            raise
        except BrainscanError as error:
            await context.abort(status_code_for(error), str(error))
        except Exception:
            log.exception("internal error in AnalyzeSeries")
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error (request id {request_id_var.get()})")
        raise AssertionError("unreachable")

    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetModelInfoResponse:
        config = self.pipeline.config
        models = [
            pb.ModelInfo(
                name=spec.name,
                version=spec.version,
                role=role,
                labels=list(spec.labels),
                input_size=spec.input_size,
            )
            for role, spec in self.pipeline.backend.specs.items()
        ]
        decision = self.pipeline.decision
        return pb.GetModelInfoResponse(
            models=models,
            backend=self.pipeline.backend.kind,
            tumor_threshold=decision.gate,
            mask_threshold=config.mask_threshold,
            detection_threshold=config.detection_threshold,
            unet_min_component_px=self.pipeline.min_component_px,
            disclaimer=DISCLAIMER,
            decision=pb.DecisionInfo(
                gate=decision.gate,
                alone=decision.alone,
                strong=decision.strong,
                min_mask_fraction=decision.min_mask_fraction,
                scope_threshold=decision.scope_threshold,
                learned_scope_check=decision.learned_scope,
            ),
        )

    async def _analyze(self, request: pb.AnalyzeRequest, context: grpc.aio.ServicerContext) -> pb.AnalyzeResponse:
        stopwatch, deadline = Stopwatch(), deadline_after(context.time_remaining())
        image, options = self._image(request), options_from_request(request)
        async with self.admission.admit_image(image, deadline) as header:
            analysis = await self.pipeline.run(
                self.pipeline.decode_step(image, header), options, deadline=deadline, stopwatch=stopwatch
            )
        return self._respond(analysis, request.image_id)

    async def _analyze_series(
        self, request_iterator: AsyncIterator[pb.AnalyzeSeriesRequest], context: grpc.aio.ServicerContext
    ) -> pb.AnalyzeSeriesResponse:
        analyzer: SeriesAnalyzer | None = None
        file_ids: list[str] = []
        async for request in request_iterator:
            if analyzer is None:
                series_options = request.options
                analyzer = SeriesAnalyzer(
                    self.pipeline,
                    options_from_analyze_options(series_options.analysis),
                    group_series=series_options.group_series,
                    dicom_seg=series_options.dicom_seg,
                    dicom_sr=series_options.dicom_sr,
                    admission=self.admission,
                    deadline=deadline_after(context.time_remaining()),
                )
            file_ids.append(request.file_id)
            await analyzer.add(request.dicom, Stopwatch())
        if analyzer is None:
            raise InvalidImage("AnalyzeSeries received no files")
        outcomes, skipped = await analyzer.finish()
        for outcome in outcomes:
            for analyzed in outcome.slices:
                if self.metrics is not None:
                    self.metrics.observe_stages(analyzed.analysis.timings_ms)
        return series_response(outcomes, skipped, file_ids, self.pipeline.model_versions)

    def _respond(self, analysis: Analysis, image_id: str) -> pb.AnalyzeResponse:
        if self.metrics is not None:
            self.metrics.observe_stages(analysis.timings_ms)
        return response_from_analysis(analysis, image_id, self.pipeline.model_versions)

    def _image(self, request: pb.AnalyzeRequest) -> bytes | np.ndarray:
        return image_from_request(request, max_side=self.pipeline.config.max_image_side)


def options_from_request(request: pb.AnalyzeRequest) -> AnalysisOptions:
    return options_from_analyze_options(request.options)


def options_from_analyze_options(options: pb.AnalyzeOptions) -> AnalysisOptions:
    return AnalysisOptions(segment=not options.skip_segmentation, detect=not options.skip_detection, gate=not options.ungated)


def image_from_request(request: pb.AnalyzeRequest, *, max_side: int = DEFAULT_MAX_SIDE) -> bytes | np.ndarray:
    kind = request.WhichOneof("image")
    if kind == "encoded":
        return request.encoded  # decode_image refuses empty bytes
    if kind == "raw":
        return array_from_raw(request.raw, max_side=max_side)
    raise InvalidImage("request carries no image: set `encoded` (PNG/JPEG/DICOM bytes) or `raw` (pixels)")


def array_from_raw(raw: pb.RawPixels, *, max_side: int = DEFAULT_MAX_SIDE) -> np.ndarray:
    if raw.dtype not in _RAW_DTYPES:
        raise InvalidImage(f"raw dtype {raw.dtype!r} is not supported; use one of {sorted(_RAW_DTYPES)}")
    shape = tuple(int(s) for s in raw.shape)
    if len(shape) not in (2, 3) or (len(shape) == 3 and shape[2] not in (1, 3, 4)):
        raise InvalidImage(f"raw shape {list(shape)} must be [H, W] or [H, W, C] with C in 1, 3, 4")
    check_size(shape[:2], max_side)  # before the byte count, which a huge shape would overflow in numpy
    dtype = np.dtype(raw.dtype).newbyteorder("<")
    expected = math.prod(shape) * dtype.itemsize
    if expected != len(raw.data):
        raise InvalidImage(
            f"raw data is {len(raw.data)} bytes but shape {list(shape)} of {raw.dtype} needs {expected}"
        )
    return np.frombuffer(raw.data, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


def response_from_analysis(analysis: Analysis, image_id: str, versions: dict[str, str]) -> pb.AnalyzeResponse:
    response = pb.AnalyzeResponse(
        image_id=image_id,
        label=analysis.label,
        probabilities=analysis.probabilities,
        tumor_probability=analysis.tumor_probability,
        tumor_detected=analysis.tumor_detected,
        model_versions=versions,
        timings_ms=analysis.timings_ms,
        image_width=analysis.image_width,
        image_height=analysis.image_height,
        segmentation_ran=analysis.segmentation_ran,
        detection_ran=analysis.detection_ran,
        scope=_scope(analysis.scope),
    )
    if analysis.segmentation is not None:
        seg = analysis.segmentation
        response.segmentation.CopyFrom(
            pb.Segmentation(mask=_mask(seg.mask), area_px=seg.area_px, bbox=_box(seg.bbox), area_mm2=seg.area_mm2)
        )
    for instance in analysis.instances:
        response.instances.append(
            pb.Instance(
                box=_box(instance.box),
                score=instance.score,
                mask=_mask(instance.mask),
                area_px=instance.area_px,
                area_mm2=instance.area_mm2,
            )
        )
    return response


def _scope(scope: Scope) -> pb.Scope:
    message = pb.Scope(assessed=scope.assessed, reason=scope.reason, detail=scope.detail)
    if scope.in_scope_probability is not None:
        message.in_scope_probability = scope.in_scope_probability
    return message


def _mask(region: MaskRegion) -> pb.Mask:
    return pb.Mask(left=region.left, top=region.top, width=region.width, height=region.height, png=region.png)


def _box(box: tuple[float, float, float, float]) -> pb.Box:
    return pb.Box(x0=box[0], y0=box[1], x1=box[2], y1=box[3])



def series_response(
    outcomes: list[SeriesOutcome], skipped: list[Skipped], file_ids: list[str], versions: dict[str, str]
) -> pb.AnalyzeSeriesResponse:
    response = pb.AnalyzeSeriesResponse(
        skipped=[pb.SkippedFile(file_id=file_ids[s.index], reason=_skip_reason(s)) for s in skipped],
        disclaimer=DISCLAIMER,
    )
    for outcome in outcomes:
        result = response.series.add(series_instance_uid=outcome.series_uid)
        if outcome.error is not None:
            result.error.CopyFrom(pb.Error(code=status_code_for(outcome.error).name, message=str(outcome.error)))
            continue
        summary = outcome.summary
        assert summary is not None  # set on every outcome without an error
        result.label, result.ordered_by = summary.label, outcome.ordered_by
        result.tumor_slices.extend(summary.tumor_slices)
        result.notes.extend(summary.notes)
        result.model_versions.update(versions)
        if summary.largest_cross_section_mm2 is not None:
            result.largest_cross_section_mm2 = summary.largest_cross_section_mm2
        if summary.volume_ml is not None:
            result.volume_ml = summary.volume_ml
        if outcome.slice_distance_mm is not None:
            result.slice_distance_mm = outcome.slice_distance_mm
        if outcome.dicom_seg is not None:
            result.dicom_seg = outcome.dicom_seg
        if outcome.dicom_sr is not None:
            result.dicom_sr = outcome.dicom_sr
        for analyzed in outcome.slices:
            header = analyzed.header
            item = result.slices.add(
                file_id=file_ids[header.file_index],
                frame=header.frame,
                sop_instance_uid=header.sop_instance_uid,
                thickness_mm=analyzed.thickness_mm or 0.0,
                result=response_from_analysis(analyzed.analysis, file_ids[header.file_index], versions),
            )
            item.result.frame = header.frame
            if analyzed.position_mm is not None:
                item.position_mm = analyzed.position_mm
    return response


def _skip_reason(skipped: Skipped) -> str:
    """A refused file's reason starts with its status (RESOURCE_EXHAUSTED: retry later; INVALID_ARGUMENT: not)."""
    return skipped.reason if skipped.error is None else f"{status_code_for(skipped.error).name}: {skipped.reason}"
