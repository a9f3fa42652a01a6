"""`Client` and `AsyncClient`: mirror images of each other, one channel each.

    with Client("localhost:50051") as client:
        result = client.analyze("slice.png")
        print(result.label, result.tumor_probability)

    # several gateways: every address of a DNS name, calls spread round robin
    with Client("dns:///gateway.brainscan.svc.cluster.local:50051") as client: ...

Research use only. Not a medical device.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from brainscan.errors import from_rpc_error
from brainscan.inputs import ImageLike, build_request
from brainscan.results import AnalysisResult, result_from_response
from brainscan.series import PathLike, SeriesAnalysis, series_files, series_from_response, series_requests
from brainscan_proto.v1 import brainscan_pb2 as pb
from brainscan_proto.v1 import brainscan_pb2_grpc as pb_grpc

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# targets that name several gateways: dns:///name:port (e.g. a Kubernetes headless Service) or a fixed
# list ipv4:host1:port,host2:port; the channel spreads calls over them round robin
BALANCED_SCHEMES = ("dns:", "ipv4:", "ipv6:")


@dataclass(frozen=True)
class ModelInfo:
    name: str
    version: str
    role: str
    labels: tuple[str, ...]
    input_size: int


@dataclass(frozen=True)
class DecisionInfo:
    """The operating points of the gateway's tumor decision (README "How the answer is decided")."""

    gate: float  # p(tumor) at which U-Net / Mask R-CNN run and their evidence can confirm a tumor
    alone: float  # p(tumor) threshold when both localization models are skipped
    strong: float  # p(tumor) at which the classifier alone suffices
    min_mask_fraction: float  # U-Net mask share of its input grid that counts as evidence
    scope_threshold: float  # classifier in_scope below this: not assessed
    learned_scope_check: bool  # False: the classifier has no in_scope output (image-level checks only)


@dataclass(frozen=True)
class ServerInfo:
    backend: str
    models: tuple[ModelInfo, ...]
    tumor_threshold: float  # = decision.gate
    disclaimer: str
    decision: DecisionInfo
    detection_threshold: float
    mask_threshold: float
    unet_min_component_px: int  # U-Net mask regions smaller than this (pixels of its input grid) are dropped


def _open_channel(
    module: Any,  # grpc or grpc.aio: both have insecure_channel / secure_channel
    target: str,
    max_message_bytes: int,
    tls_ca: str | os.PathLike | None,
    tls_cert: str | os.PathLike | None,
    tls_key: str | os.PathLike | None,
) -> Any:
    options = [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]
    if target.startswith(BALANCED_SCHEMES):
        # every address the name resolves to, calls in turn (gRPC's default, pick_first, pins one)
        options.append(("grpc.lb_policy_name", "round_robin"))
    credentials = _credentials(tls_ca, tls_cert, tls_key)
    if credentials is None:
        return module.insecure_channel(target, options=options)
    return module.secure_channel(target, credentials, options=options)


def _credentials(
    tls_ca: str | os.PathLike | None, tls_cert: str | os.PathLike | None, tls_key: str | os.PathLike | None
) -> grpc.ChannelCredentials | None:
    """TLS when any TLS option is given; mutual TLS when a client certificate and key are."""
    if tls_ca is None and tls_cert is None and tls_key is None:
        return None
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("mutual TLS needs both tls_cert and tls_key")
    read = lambda path: Path(path).read_bytes() if path is not None else None  # noqa: E731
    return grpc.ssl_channel_credentials(
        root_certificates=read(tls_ca), private_key=read(tls_key), certificate_chain=read(tls_cert)
    )


def _metadata(token: str | None) -> tuple[tuple[str, str], ...] | None:
    return (("authorization", f"Bearer {token}"),) if token else None


def _server_info(response: pb.GetModelInfoResponse) -> ServerInfo:
    return ServerInfo(
        backend=response.backend,
        models=tuple(
            ModelInfo(m.name, m.version, m.role, tuple(m.labels), m.input_size) for m in response.models
        ),
        tumor_threshold=response.tumor_threshold,
        disclaimer=response.disclaimer,
        decision=DecisionInfo(
            gate=response.decision.gate,
            alone=response.decision.alone,
            strong=response.decision.strong,
            min_mask_fraction=response.decision.min_mask_fraction,
            scope_threshold=response.decision.scope_threshold,
            learned_scope_check=response.decision.learned_scope_check,
        ),
        detection_threshold=response.detection_threshold,
        mask_threshold=response.mask_threshold,
        unet_min_component_px=response.unet_min_component_px,
    )


def _series_timeout(given: float | None, per_image: float | None, files: int) -> float | None:
    if given is not None:
        return given
    return None if per_image is None else per_image * max(1, files)


class Client:
    """Blocking client. Keyword-only options; reuses one channel; a context manager."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout_s: float | None = 30.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        tls_ca: str | os.PathLike | None = None,
        tls_cert: str | os.PathLike | None = None,
        tls_key: str | os.PathLike | None = None,
        token: str | None = None,
    ) -> None:
        self.target = target
        self.timeout_s = timeout_s
        self._channel = _open_channel(grpc, target, max_message_bytes, tls_ca, tls_cert, tls_key)
        self._metadata = _metadata(token)
        self._stub = pb_grpc.BrainScanStub(self._channel)

    def analyze(
        self,
        image: ImageLike,
        *,
        segment: bool = True,
        detect: bool = True,
        gate: bool = True,
        image_id: str = "",
        timeout_s: float | None = None,
    ) -> AnalysisResult:
        request = build_request(image, segment=segment, detect=detect, gate=gate, image_id=image_id)
        try:
            response = self._stub.Analyze(request, timeout=self.timeout_s if timeout_s is None else timeout_s, metadata=self._metadata)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        return result_from_response(response)

    def analyze_many(
        self,
        images: Iterable[ImageLike],
        *,
        segment: bool = True,
        detect: bool = True,
        gate: bool = True,
        timeout_s: float | None = None,
    ) -> Iterator[AnalysisResult]:
        """Stream a series through AnalyzeStream; yields results in order.

        A slice the server refuses raises its error when its turn comes.
        """
        requests = (build_request(img, segment=segment, detect=detect, gate=gate) for img in images)
        try:
            for response in self._stub.AnalyzeStream(requests, timeout=timeout_s, metadata=self._metadata):
                yield result_from_response(response)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None

    def analyze_series(
        self,
        paths_or_folder: PathLike | Iterable[PathLike],
        *,
        segment: bool = True,
        detect: bool = True,
        gate: bool = True,
        group_series: bool = False,
        dicom_seg: bool = False,
        dicom_sr: bool = False,
        timeout_s: float | None = None,
    ) -> SeriesAnalysis:
        """Analyze whole DICOM series (a folder, or files) through AnalyzeSeries.

        Files of several series need `group_series`; `dicom_seg` asks for a DICOM SEG per series,
        `dicom_sr` for a DICOM SR (TID 1500) with its measurements too.
        The deadline defaults to the client's per-image timeout times the number of files.
        """
        paths, skipped = series_files(paths_or_folder)
        requests = series_requests(
            paths, segment=segment, detect=detect, gate=gate, group_series=group_series, dicom_seg=dicom_seg, dicom_sr=dicom_sr
        )
        try:
            response = self._stub.AnalyzeSeries(
                requests, timeout=_series_timeout(timeout_s, self.timeout_s, len(paths)), metadata=self._metadata
            )
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        return series_from_response(response, skipped)

    def model_info(self) -> ServerInfo:
        try:
            return _server_info(self._stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=self.timeout_s, metadata=self._metadata))
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient:
    """asyncio twin of `Client` (grpc.aio)."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout_s: float | None = 30.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        tls_ca: str | os.PathLike | None = None,
        tls_cert: str | os.PathLike | None = None,
        tls_key: str | os.PathLike | None = None,
        token: str | None = None,
    ) -> None:
        self.target = target
        self.timeout_s = timeout_s
        self._channel = _open_channel(grpc.aio, target, max_message_bytes, tls_ca, tls_cert, tls_key)
        self._metadata = _metadata(token)
        self._stub = pb_grpc.BrainScanStub(self._channel)

    async def analyze(
        self,
        image: ImageLike,
        *,
        segment: bool = True,
        detect: bool = True,
        gate: bool = True,
        image_id: str = "",
        timeout_s: float | None = None,
    ) -> AnalysisResult:
        request = build_request(image, segment=segment, detect=detect, gate=gate, image_id=image_id)
        try:
            response = await self._stub.Analyze(request, timeout=self.timeout_s if timeout_s is None else timeout_s, metadata=self._metadata)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        return result_from_response(response)

    async def analyze_many(
        self,
        images: Iterable[ImageLike],
        *,
        segment: bool = True,
        detect: bool = True,
        gate: bool = True,
        timeout_s: float | None = None,
    ) -> AsyncIterator[AnalysisResult]:
        requests = [build_request(img, segment=segment, detect=detect, gate=gate) for img in images]
        call = self._stub.AnalyzeStream(iter(requests), timeout=timeout_s, metadata=self._metadata)
        try:
            async for response in call:
                yield result_from_response(response)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None

    async def analyze_series(
        self,
        paths_or_folder: PathLike | Iterable[PathLike],
        *,
        segment: bool = True,
        detect: bool = True,
        gate: bool = True,
        group_series: bool = False,
        dicom_seg: bool = False,
        dicom_sr: bool = False,
        timeout_s: float | None = None,
    ) -> SeriesAnalysis:
        paths, skipped = series_files(paths_or_folder)
        requests = series_requests(
            paths, segment=segment, detect=detect, gate=gate, group_series=group_series, dicom_seg=dicom_seg, dicom_sr=dicom_sr
        )
        try:
            response = await self._stub.AnalyzeSeries(
                requests, timeout=_series_timeout(timeout_s, self.timeout_s, len(paths)), metadata=self._metadata
            )
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        return series_from_response(response, skipped)

    async def model_info(self) -> ServerInfo:
        try:
            response = await self._stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=self.timeout_s, metadata=self._metadata)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        return _server_info(response)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
