"""KServe v2 `inference.GRPCInferenceService` for one model, `brainscan_pipeline`.

It lets perf_analyzer (and any KServe client) drive the whole pipeline over
the gateway's port. Registered only with `--kserve` / BRAINSCAN_KSERVE (off by
default), under the gateway's one admission limit. The servicer base class and messages are the ones
generated in tritonclient, so the protocol is never written by hand.

    IMAGE              BYTES [1]     encoded PNG / JPEG / DICOM
    PROBABILITIES      FP32  [C]     in label order (config parameter `labels`)
    TUMOR_PROBABILITY  FP32  [1]
    TUMOR_DETECTED     BOOL  [1]     the decision (README "How the answer is decided")
    LABEL              BYTES [1]     glioma, meningioma, pituitary, no_tumor or not_assessed
    SCOPE_REASON       BYTES [1]     b"" when the slice was judged; else blank, colour_image or ct_or_not_mri
    MASK_PNG           BYTES [1]     U-Net mask cut to MASK_BOX, 8-bit PNG (0/255); b"" when empty
    MASK_BOX           INT32 [4]     x0, y0, x1, y1 of MASK_PNG in the original pixels (zeros when empty)
    BOXES              FP32  [N, 4]  Mask R-CNN instances, original pixels
    SCORES             FP32  [N]

Request parameters (optional, bool): `ungated` runs U-Net and Mask R-CNN on
every image, `skip_segmentation`, `skip_detection`. ModelStatistics reports
the pipeline and, on the embedded backend, the batch sizes each model formed.

Research use only; not a medical device.
"""

from __future__ import annotations

import logging
import struct
import time

import grpc
import numpy as np
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as kpb
from tritonclient.grpc import service_pb2_grpc as kgrpc

from gateway.batching import BatchStats
from gateway.contract import DISCLAIMER
from gateway.admission import Admission
from gateway.errors import BrainscanError, InvalidImage
from gateway.status_codes import status_code_for
from gateway.observability import request_id_var
from gateway.pipeline import Analysis, AnalysisOptions, Pipeline
from gateway.request_clock import Stopwatch, deadline_after

log = logging.getLogger("brainscan.gateway.kserve")

MODEL_NAME = "brainscan_pipeline"
MODEL_VERSION = "1"
PLATFORM = "brainscan_gateway"
_DTYPES = {"FP32": mc.TYPE_FP32, "INT32": mc.TYPE_INT32, "BYTES": mc.TYPE_STRING, "BOOL": mc.TYPE_BOOL}


def _tensors(num_classes: int) -> tuple[list[tuple[str, str, list[int]]], list[tuple[str, str, list[int]]]]:
    inputs = [("IMAGE", "BYTES", [1])]
    outputs = [
        ("PROBABILITIES", "FP32", [num_classes]),
        ("TUMOR_PROBABILITY", "FP32", [1]),
        ("TUMOR_DETECTED", "BOOL", [1]),
        ("LABEL", "BYTES", [1]),
        ("SCOPE_REASON", "BYTES", [1]),
        ("MASK_PNG", "BYTES", [1]),
        ("MASK_BOX", "INT32", [4]),
        ("BOXES", "FP32", [-1, 4]),
        ("SCORES", "FP32", [-1]),
    ]
    return inputs, outputs


class KServeService(kgrpc.GRPCInferenceServiceServicer):
    def __init__(self, pipeline: Pipeline, *, admission: Admission) -> None:
        self.pipeline = pipeline
        self.admission = admission  # shared with the BrainScan service: one limit for the whole gateway
        self._stats = BatchStats(model=MODEL_NAME)
        self._failures = 0
        self._fail_ns = 0
        self._last_inference_ms = 0

    # --- health and metadata -----------------------------------------------

    async def ServerLive(
        self, request: kpb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> kpb.ServerLiveResponse:
        return kpb.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: kpb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> kpb.ServerReadyResponse:
        return kpb.ServerReadyResponse(ready=await self.pipeline.backend.is_ready())

    async def ModelReady(
        self, request: kpb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> kpb.ModelReadyResponse:
        known = request.name == MODEL_NAME and request.version in ("", MODEL_VERSION)
        return kpb.ModelReadyResponse(ready=known and await self.pipeline.backend.is_ready())

    async def ServerMetadata(
        self, request: kpb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> kpb.ServerMetadataResponse:
        return kpb.ServerMetadataResponse(name="brainscan", version=MODEL_VERSION, extensions=["statistics"])

    async def ModelMetadata(
        self, request: kpb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> kpb.ModelMetadataResponse:
        await self._check_model(request.name, request.version, context)
        inputs, outputs = _tensors(len(self._labels))
        return kpb.ModelMetadataResponse(
            name=MODEL_NAME,
            versions=[MODEL_VERSION],
            platform=PLATFORM,
            inputs=[kpb.ModelMetadataResponse.TensorMetadata(name=n, datatype=d, shape=s) for n, d, s in inputs],
            outputs=[kpb.ModelMetadataResponse.TensorMetadata(name=n, datatype=d, shape=s) for n, d, s in outputs],
        )

    async def ModelConfig(
        self, request: kpb.ModelConfigRequest, context: grpc.aio.ServicerContext
    ) -> kpb.ModelConfigResponse:
        await self._check_model(request.name, request.version, context)
        inputs, outputs = _tensors(len(self._labels))
        config = mc.ModelConfig(name=MODEL_NAME, platform=PLATFORM, max_batch_size=0)
        for name, dtype, dims in inputs:
            config.input.add(name=name, data_type=_DTYPES[dtype], dims=dims)
        for name, dtype, dims in outputs:
            config.output.add(name=name, data_type=_DTYPES[dtype], dims=dims)
        config.parameters["labels"].string_value = ",".join(self._labels)
        config.parameters["models"].string_value = ",".join(
            f"{name}:{version}" for name, version in sorted(self.pipeline.model_versions.items())
        )
        config.parameters["disclaimer"].string_value = DISCLAIMER
        return kpb.ModelConfigResponse(config=config)

    async def ModelStatistics(
        self, request: kpb.ModelStatisticsRequest, context: grpc.aio.ServicerContext
    ) -> kpb.ModelStatisticsResponse:
        stats = [self._pipeline_statistics()] + [
            _model_statistics(role, self.pipeline.backend.specs[role].version, batch)
            for role, batch in getattr(self.pipeline.backend, "stats", {}).items()
        ]
        if request.name:
            stats = [s for s in stats if s.name == request.name]
            if not stats:
                await context.abort(grpc.StatusCode.NOT_FOUND, f"no statistics for model {request.name!r}")
        return kpb.ModelStatisticsResponse(model_stats=stats)

    # --- inference ---------------------------------------------------------

    async def ModelInfer(
        self, request: kpb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> kpb.ModelInferResponse:
        started, stopwatch = time.perf_counter(), Stopwatch()
        try:
            await self._check_model(request.model_name, request.model_version, context)
            image = image_from_request(request)
            analysis = await self._analyze(image, options_from_parameters(request.parameters), context, stopwatch)
            response = response_from_analysis(analysis, self._labels, request)
        except grpc.aio.AbortError:
            raise
        except BrainscanError as error:
            self._failures += 1
            self._fail_ns += int((time.perf_counter() - started) * 1e9)
            await context.abort(status_code_for(error), str(error))
        except Exception:
            log.exception("internal error in ModelInfer")
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error (request id {request_id_var.get()})")
        self._stats.record(1, 1, time.perf_counter() - started)
        self._last_inference_ms = int(time.time() * 1000)
        return response

    # --- internals ---------------------------------------------------------

    @property
    def _labels(self) -> tuple[str, ...]:
        return self.pipeline.backend.specs["classifier"].labels

    async def _check_model(self, name: str, version: str, context: grpc.aio.ServicerContext) -> None:
        if name != MODEL_NAME or version not in ("", MODEL_VERSION):
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"unknown model {name!r} version {version!r}; this gateway serves {MODEL_NAME!r} version {MODEL_VERSION}",
            )

    async def _analyze(
        self, image: bytes, options: AnalysisOptions, context: grpc.aio.ServicerContext, stopwatch: Stopwatch
    ) -> Analysis:
        deadline = deadline_after(context.time_remaining())
        async with self.admission.admit_image(image, deadline) as header:
            return await self.pipeline.run(
                self.pipeline.decode_step(image, header), options, deadline=deadline, stopwatch=stopwatch
            )

    def _pipeline_statistics(self) -> kpb.ModelStatistics:
        stats = _model_statistics(MODEL_NAME, MODEL_VERSION, self._stats)
        stats.last_inference = self._last_inference_ms
        stats.inference_stats.fail.count = self._failures
        stats.inference_stats.fail.ns = self._fail_ns
        return stats


def register(server: grpc.aio.Server, pipeline: Pipeline, *, admission: Admission) -> KServeService:
    """Add the KServe v2 service for `brainscan_pipeline` to a grpc.aio server."""
    service = KServeService(pipeline, admission=admission)
    kgrpc.add_GRPCInferenceServiceServicer_to_server(service, server)
    return service


def image_from_request(request: kpb.ModelInferRequest) -> bytes:
    """The encoded image of input IMAGE (raw_input_contents or typed contents)."""
    names = [tensor.name for tensor in request.inputs]
    if names != ["IMAGE"]:
        raise InvalidImage(f"{MODEL_NAME} takes exactly one input, IMAGE (BYTES [1]); got {names}")
    tensor = request.inputs[0]
    if tensor.datatype != "BYTES" or list(tensor.shape) not in ([1], [1, 1]):
        raise InvalidImage(
            f"input IMAGE must be BYTES with shape [1]; got {tensor.datatype} {list(tensor.shape)}"
        )
    if request.raw_input_contents:
        elements = deserialize_bytes(request.raw_input_contents[0])
    else:
        elements = list(tensor.contents.bytes_contents)
    if len(elements) != 1:
        raise InvalidImage(f"input IMAGE must hold one encoded image; got {len(elements)} elements")
    return elements[0]  # decode_image refuses empty bytes


def options_from_parameters(parameters) -> AnalysisOptions:
    def flag(name: str) -> bool:
        if name not in parameters:
            return False
        value = parameters[name]
        kind = value.WhichOneof("parameter_choice")
        if kind == "string_param":
            return value.string_param.lower() in ("1", "true", "yes")
        return bool(getattr(value, kind)) if kind else False

    return AnalysisOptions(
        segment=not flag("skip_segmentation"), detect=not flag("skip_detection"), gate=not flag("ungated")
    )


def response_from_analysis(
    analysis: Analysis, labels: tuple[str, ...], request: kpb.ModelInferRequest
) -> kpb.ModelInferResponse:
    segmentation = analysis.segmentation
    if segmentation is not None:
        region = segmentation.mask
        mask_png = region.png  # encoded once, in postprocessing
        mask_box = [region.left, region.top, region.left + region.width, region.top + region.height]
    else:
        mask_png, mask_box = b"", [0, 0, 0, 0]
    instances = analysis.instances
    values: dict[str, tuple[str, list[int], bytes]] = {
        "PROBABILITIES": _fp32([analysis.probabilities[label] for label in labels]),
        "TUMOR_PROBABILITY": _fp32([analysis.tumor_probability]),
        "TUMOR_DETECTED": ("BOOL", [1], np.asarray([analysis.tumor_detected], dtype=np.bool_).tobytes()),
        "LABEL": ("BYTES", [1], serialize_bytes([analysis.label.encode()])),
        "SCOPE_REASON": ("BYTES", [1], serialize_bytes([analysis.scope.reason.encode()])),
        "MASK_PNG": ("BYTES", [1], serialize_bytes([mask_png])),
        "MASK_BOX": ("INT32", [4], np.asarray(mask_box, dtype="<i4").tobytes()),
        "BOXES": ("FP32", [len(instances), 4], np.asarray([i.box for i in instances], "<f4").reshape(-1, 4).tobytes()),
        "SCORES": _fp32([i.score for i in instances]),
    }
    wanted = [o.name for o in request.outputs] or list(values)
    unknown = sorted(set(wanted) - set(values))
    if unknown:
        raise InvalidImage(f"unknown output(s) {unknown}; {MODEL_NAME} has {list(values)}")
    response = kpb.ModelInferResponse(model_name=MODEL_NAME, model_version=MODEL_VERSION, id=request.id)
    for name in wanted:
        dtype, shape, raw = values[name]
        response.outputs.add(name=name, datatype=dtype, shape=shape)
        response.raw_output_contents.append(raw)
    return response


def serialize_bytes(elements: list[bytes]) -> bytes:
    """KServe raw BYTES layout: each element as a 4-byte little-endian length, then its bytes."""
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def deserialize_bytes(raw: bytes) -> list[bytes]:
    elements, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise InvalidImage("raw BYTES input is truncated (length prefix cut off)")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise InvalidImage(
                f"raw BYTES input is malformed: element of {length} bytes, {len(raw) - offset} left. Each element "
                "needs a 4-byte little-endian length prefix (with perf_analyzer, put it inside the b64 data; "
                "`python -m bench.perf_input` writes such a file)"
            )
        elements.append(raw[offset : offset + length])
        offset += length
    return elements


def _fp32(values: list[float]) -> tuple[str, list[int], bytes]:
    return "FP32", [len(values)], np.asarray(values, dtype="<f4").tobytes()


def _model_statistics(name: str, version: str, stats: BatchStats) -> kpb.ModelStatistics:
    """Triton-shaped statistics: counts, summed durations, and one entry per batch size formed."""
    result = kpb.ModelStatistics(
        name=name, version=version, inference_count=stats.requests, execution_count=stats.batches
    )
    result.inference_stats.success.count = stats.requests
    result.inference_stats.success.ns = stats.run_ns + stats.queue_ns
    result.inference_stats.queue.count = stats.requests
    result.inference_stats.queue.ns = stats.queue_ns
    for stage in ("compute_input", "compute_infer", "compute_output"):  # perf_analyzer wants equal counts
        getattr(result.inference_stats, stage).count = stats.requests
    result.inference_stats.compute_infer.ns = stats.run_ns
    for size, count in stats.histogram().items():
        entry = result.batch_stats.add(batch_size=size)
        for stage in (entry.compute_input, entry.compute_infer, entry.compute_output):
            stage.count = count
    return result
