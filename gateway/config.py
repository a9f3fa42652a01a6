"""Gateway settings: defaults < environment < command-line flags.

`SETTINGS` is the one table mapping each setting to its environment variable;
the effective values are logged once at start-up (see server.py).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def _default_threads() -> int:
    return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class GatewayConfig:
    host: str = "127.0.0.1"
    port: int = 50051
    backend: str = "embedded"  # embedded | triton
    model_repository: Path = PROJECT_ROOT / "model_repository"
    # one or more Triton gRPC targets, comma-separated: host:port, or dns:///name:port for every
    # address the name resolves to (re-resolved while running; a Kubernetes headless Service)
    triton_url: str = "127.0.0.1:8001"
    # Overrides of the decision's operating points, which the classifier's config.pbtxt parameters carry
    # (gateway/decision.py; None = the model's value, else its documented default)
    decision_gate: float | None = None
    decision_alone: float | None = None
    decision_strong: float | None = None
    decision_min_mask_fraction: float | None = None
    scope_threshold: float | None = None
    mask_threshold: float = 0.5
    detection_threshold: float = 0.5
    # U-Net mask regions under this many pixels of its input grid are dropped; None = the U-Net's
    # config.pbtxt parameter min_component_px (0 when absent: nothing dropped)
    unet_min_component_px: int | None = None
    max_request_mb: float = 32.0
    max_image_side: int = 8192
    max_in_flight: int = 64
    # Decoded pixels (all frames), read from headers before decoding: per request, and across requests in flight.
    max_request_pixels: int = 1 << 25  # 32 Mi: 128 frames of 512×512, or one 5792×5792 image
    max_inflight_pixels: int = 1 << 25
    worker_threads: int = field(default_factory=_default_threads)
    ort_threads: int = field(default_factory=_default_threads)
    ort_concurrent_runs: int = 0  # embedded backend: session runs at once (0 = auto: max(2, cores // ort_threads); GPU 4)
    batch_max_size: int = 8  # embedded backend: rows per batched model call (1 = no batching)
    batch_max_delay_ms: float = 2.0  # embedded backend: longest wait for a batch to fill (0 = no batching)
    grace_period_s: float = 10.0
    tls_cert: Path | None = None  # PEM server certificate chain; with tls_key turns TLS on
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # PEM CA bundle: clients must present a certificate it signed (mTLS)
    auth_token_file: Path | None = None  # one accepted bearer token per line
    metrics_port: int | None = None  # Prometheus /metrics on host:metrics_port; None = off
    # clients' connections are closed after this long (calls in flight get grace_period_s): they reconnect
    # and re-resolve, so gateways added by scaling get calls from long-lived clients too; None = never
    max_connection_age_s: float | None = None
    # plaintext port serving only grpc.health.v1, for probes that cannot speak TLS (kubelet); None = off
    health_port: int | None = None
    log_format: str = "json"  # json | text
    # also serve the KServe v2 inference API (model brainscan_pipeline) on the same port, under the same
    # admission limit: for perf_analyzer load tests of the whole pipeline, not needed by clients
    kserve: bool = False

    @property
    def max_request_bytes(self) -> int:
        return int(self.max_request_mb * 1024 * 1024)


# setting name → environment variable
SETTINGS: dict[str, str] = {f.name: f"BRAINSCAN_{f.name.upper()}" for f in dataclasses.fields(GatewayConfig)}


def load_config(overrides: dict[str, object] | None = None, environ: dict[str, str] | None = None) -> GatewayConfig:
    """Build the config from the environment, then apply non-None overrides (from flags)."""
    environ = dict(os.environ) if environ is None else environ
    values: dict[str, object] = {}
    types = {f.name: f.type for f in dataclasses.fields(GatewayConfig)}
    for name, variable in SETTINGS.items():
        if variable in environ:
            values[name] = _coerce(types[name], environ[variable], variable)
    for name, value in (overrides or {}).items():
        if value is not None:
            values[name] = value
    config = GatewayConfig(**values)
    if config.backend not in ("embedded", "triton"):
        raise ValueError(f"backend must be 'embedded' or 'triton', got {config.backend!r}")
    if (config.tls_cert is None) != (config.tls_key is None):
        raise ValueError("TLS needs both --tls-cert and --tls-key")
    if config.tls_client_ca is not None and config.tls_cert is None:
        raise ValueError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
    if config.backend == "triton":
        triton_targets(config.triton_url)  # refuse a malformed list before anything starts
    if config.log_format not in ("json", "text"):
        raise ValueError(f"log format must be 'json' or 'text', got {config.log_format!r}")
    return config


DNS_SCHEME = "dns:///"


def triton_targets(spec: str) -> tuple[str, ...]:
    """'host1:8001,host2:8001' or 'dns:///name:8001' → the targets, each checked to end in a port."""
    targets = tuple(part.strip() for part in spec.split(","))
    for target in targets:
        address = target.removeprefix(DNS_SCHEME)
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(
                f"Triton target {target!r} in --triton-url {spec!r} is not host:port or dns:///name:port"
            )
    return targets


def _boolean(raw: str) -> bool:
    words = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}
    if raw.strip().lower() not in words:
        raise ValueError(raw)
    return words[raw.strip().lower()]


def _coerce(type_name: object, raw: str, variable: str) -> object:
    converters = {
        "int": int, "float": float, "str": str, "Path": Path, "Path | None": Path, "int | None": int,
        "float | None": float, "bool": _boolean,
    }
    converter = converters.get(str(type_name), str)
    try:
        return converter(raw)
    except ValueError:
        raise ValueError(f"{variable}={raw!r} is not a valid {type_name}") from None
