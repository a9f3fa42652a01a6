"""Structured logs with a request id, and Prometheus metrics on their own port.

Nothing here ever sees image content or DICOM headers: logs carry the method,
status, timings and request id only (DICOM headers hold patient data).
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")

_STAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


class JsonFormatter(logging.Formatter):
    _STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "request_id"}

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            "request_id": getattr(record, "request_id", "-"),
        }
        entry.update({k: v for k, v in vars(record).items() if k not in self._STANDARD})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str = "INFO", fmt: str = "json") -> None:
    """One handler on the root logger; with `json`, every line on stderr is one JSON object, including what
    C libraries (libpng, OpenCV, ...) print and Python warnings."""
    if fmt == "json":
        _relay_native_stderr()
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RequestIdFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.captureWarnings(True)
    from gateway.dicom_decode import withhold_dicom_values_from_logs

    withhold_dicom_values_from_logs()  # after captureWarnings, whose hook it wraps


_NATIVE_LINE_CHARS = 300
_relaying = False


def _relay_native_stderr() -> None:
    """Point file descriptor 2 at a pipe whose lines become log records; Python keeps the real stderr.

    C code writes its warnings straight to descriptor 2, around the logging module: without this they
    reach the log as bare text lines among the JSON ones.
    """
    global _relaying
    if _relaying:
        return
    real_stderr = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace")
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    sys.stderr = real_stderr
    _relaying = True
    threading.Thread(target=_relay_lines, args=(read_end,), name="native-stderr", daemon=True).start()


def _relay_lines(read_end: int) -> None:
    log = logging.getLogger("brainscan.native")
    with os.fdopen(read_end, "rb") as pipe:
        for raw in pipe:
            text = raw.decode("utf-8", errors="replace").strip()
            if text:
                log.warning("C library output", extra={"text": text[:_NATIVE_LINE_CHARS]})


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        self.requests = Counter(
            "brainscan_requests", "Finished RPCs by method and gRPC status code", ("method", "code"),
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "brainscan_request_seconds", "RPC latency by method", ("method",), buckets=_STAGE_BUCKETS,
            registry=self.registry,
        )
        self.stage_seconds = Histogram(
            "brainscan_stage_seconds", "Pipeline stage latency (decode, preprocess, each model, postprocess)",
            ("stage",), buckets=_STAGE_BUCKETS, registry=self.registry,
        )
        self.in_flight = Gauge("brainscan_in_flight", "RPCs being handled now", registry=self.registry)
        self.model_info = Gauge(
            "brainscan_model_info", "Served models (value 1)", ("model", "version", "backend"), registry=self.registry
        )

    def observe_stages(self, timings_ms: dict[str, float]) -> None:
        for stage, ms in timings_ms.items():
            self.stage_seconds.labels(stage=stage).observe(ms / 1000.0)

    def serve(self, host: str, port: int) -> int:
        """Start the /metrics HTTP endpoint; returns the bound port (port 0 picks a free one)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._http = server
        return int(server.server_port)

    def close(self) -> None:
        http = getattr(self, "_http", None)
        if http is not None:
            http.shutdown()
            http.server_close()
