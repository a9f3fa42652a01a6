"""Builds and runs the grpc.aio gateway: BrainScan service, health, reflection (KServe v2 with `--kserve`).

`build_server(config)` returns a `Gateway` whose server is bound (port 0 picks a
free one) but not started; `serve(config)` runs it until SIGINT/SIGTERM.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from brainscan_proto.v1 import brainscan_pb2, brainscan_pb2_grpc
from gateway import kserve
from gateway.admission import Admission
from gateway.backends.base import Backend
from gateway.config import GatewayConfig
from gateway.interceptors import GatewayInterceptor, load_tokens
from gateway.observability import Metrics
from gateway.pipeline import Pipeline
from gateway.service import BrainScanService

log = logging.getLogger("brainscan.gateway")

SERVICE_NAME = brainscan_pb2.DESCRIPTOR.services_by_name["BrainScan"].full_name
# SERVING from start until shutdown whatever the backend does: a liveness probe asks for it, so a
# model-server outage takes gateways out of rotation (readiness) without restarting them
LIVENESS_SERVICE = "brainscan.liveness"
HEALTH_POLL_S = 2.0


def make_backend(config: GatewayConfig, executor: ThreadPoolExecutor) -> Backend:
    if config.backend == "triton":
        from gateway.backends.triton import TritonBackend

        return TritonBackend(config.triton_url, config.model_repository)
    from gateway.backends.embedded import EmbeddedBackend

    return EmbeddedBackend(
        config.model_repository,
        threads=config.ort_threads,
        concurrent=config.ort_concurrent_runs,
        batch_max_size=config.batch_max_size,
        batch_max_delay_ms=config.batch_max_delay_ms,
    )


def grpc_options(config: GatewayConfig) -> list[tuple[str, int]]:
    options = [
        ("grpc.max_receive_message_length", config.max_request_bytes),
        ("grpc.max_send_message_length", config.max_request_bytes),
    ]
    if config.max_connection_age_s is not None:
        options += [
            ("grpc.max_connection_age_ms", int(config.max_connection_age_s * 1000)),
            ("grpc.max_connection_age_grace_ms", int(config.grace_period_s * 1000)),
        ]
    return options


@dataclass
class Gateway:
    server: grpc.aio.Server
    port: int
    backend: Backend
    health: health.aio.HealthServicer
    config: GatewayConfig
    executor: ThreadPoolExecutor
    metrics: Metrics
    metrics_port: int | None = None
    health_server: grpc.aio.Server | None = None  # plaintext, health only (config.health_port)
    health_port: int | None = None
    pipeline: Pipeline | None = None
    _health_task: asyncio.Task | None = None

    async def start(self) -> None:
        """Load models, start serving, report SERVING once the backend is ready."""
        await self.backend.start()
        if self.pipeline is not None:  # the decision's parameters, checked (and logged) before serving
            log.info("decision parameters: %s", asdict(self.pipeline.decision))
        for spec in self.backend.specs.values():
            self.metrics.model_info.labels(model=spec.name, version=spec.version, backend=self.backend.kind).set(1)
        if self.config.metrics_port is not None:
            self.metrics_port = self.metrics.serve(self.config.host, self.config.metrics_port)
        await self.server.start()
        if self.health_server is not None:
            await self.health_server.start()
        await self.health.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        await self._set_health(await self.backend.is_ready())
        self._health_task = asyncio.create_task(self._watch_backend())
        log.info("gateway listening on %s:%d (backend %s)", self.config.host, self.port, self.backend.kind)

    async def stop(self, grace_s: float | None = None) -> None:
        """Health goes NOT_SERVING first, then in-flight calls get `grace_s` to finish."""
        await self.health.enter_graceful_shutdown()
        if self._health_task is not None:
            self._health_task.cancel()
        await self.server.stop(self.config.grace_period_s if grace_s is None else grace_s)
        if self.health_server is not None:
            await self.health_server.stop(0)
        await self.backend.close()
        self.metrics.close()
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def _set_health(self, ready: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def _watch_backend(self) -> None:
        # Keeps health honest when a remote model server goes away and comes back.
        while True:
            await asyncio.sleep(HEALTH_POLL_S)
            try:
                ready = await self.backend.is_ready()
            except Exception:  # a health probe must never kill the loop
                ready = False
            await self._set_health(ready)


def server_credentials(config: GatewayConfig) -> grpc.ServerCredentials | None:
    if config.tls_cert is None or config.tls_key is None:
        return None
    client_ca = config.tls_client_ca.read_bytes() if config.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(config.tls_key.read_bytes(), config.tls_cert.read_bytes())],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


def build_server(config: GatewayConfig) -> Gateway:
    executor = ThreadPoolExecutor(max_workers=max(2, config.worker_threads), thread_name_prefix="pre")
    backend = make_backend(config, executor)
    pipeline = Pipeline(backend, config, executor)
    metrics = Metrics()
    tokens = load_tokens(config.auth_token_file) if config.auth_token_file else ()
    server = grpc.aio.server(
        options=grpc_options(config), interceptors=[GatewayInterceptor(metrics=metrics, tokens=tokens)]
    )
    admission = Admission.from_config(config)  # one limit for every API served
    brainscan_pb2_grpc.add_BrainScanServicer_to_server(
        BrainScanService(pipeline, admission=admission, metrics=metrics), server
    )
    if config.kserve:  # KServe v2 for perf_analyzer, off unless asked for
        kserve.register(server, pipeline, admission=admission)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    address = f"{config.host}:{config.port}"
    credentials = server_credentials(config)
    if credentials is None:
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, credentials)
    if port == 0:
        raise OSError(f"could not bind {address} (address in use?)")
    health_server, health_port = None, None
    if config.health_port is not None:
        health_server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, health_server)
        health_port = health_server.add_insecure_port(f"{config.host}:{config.health_port}")
        if health_port == 0:
            raise OSError(f"could not bind the health port {config.host}:{config.health_port} (address in use?)")
    return Gateway(
        server=server, port=port, backend=backend, health=health_servicer, config=config, executor=executor,
        metrics=metrics, health_server=health_server, health_port=health_port, pipeline=pipeline,
    )


async def serve(config: GatewayConfig, *, ready_message: bool = True) -> None:
    log.info("effective settings: %s", {k: str(v) for k, v in asdict(config).items()})
    gateway = build_server(config)
    await gateway.start()
    if ready_message:
        scheme = "TLS" if config.tls_cert else "plaintext"
        metrics = f", metrics on :{gateway.metrics_port}/metrics" if gateway.metrics_port else ""
        metrics += f", plaintext health on :{gateway.health_port}" if gateway.health_port else ""
        print(
            f"brainscan gateway serving on {config.host}:{gateway.port} (backend: {config.backend}, {scheme}{metrics})",
            flush=True,
        )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down: draining in-flight requests for up to %.1f s", config.grace_period_s)
    await gateway.stop()
