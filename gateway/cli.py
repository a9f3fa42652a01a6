"""`brainscan-server` (or `python -m gateway`): start the gRPC gateway.

Research use only. Not a medical device; not for diagnosis or treatment decisions.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from gateway.contract import DISCLAIMER


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="brainscan-server",
        description=f"Start the brainscan gRPC gateway. {DISCLAIMER} "
        "Every flag also reads BRAINSCAN_<FLAG> from the environment (see the README's settings table).",
    )
    parser.add_argument("--host", help="address to bind (default 127.0.0.1, env BRAINSCAN_HOST)")
    parser.add_argument("--port", type=int, help="port to bind (default 50051, env BRAINSCAN_PORT)")
    parser.add_argument("--backend", choices=("embedded", "triton"), help="model runtime (default embedded)")
    parser.add_argument("--model-repository", type=Path, help="Triton model repository (default ./model_repository)")
    parser.add_argument("--triton-url", help="Triton gRPC address(es) for --backend triton: host:port, comma-separated, "
                        "or dns:///name:port for every address a name resolves to (default 127.0.0.1:8001)")
    parser.add_argument("--max-in-flight", type=int, help="concurrent requests before RESOURCE_EXHAUSTED (default 64)")
    parser.add_argument("--batch-max-size", type=int, help="embedded backend: rows per batched model call (default 8)")
    parser.add_argument("--batch-max-delay-ms", type=float, help="embedded backend: max wait to fill a batch, 0 = off (default 2)")
    parser.add_argument("--tls-cert", type=Path, help="PEM certificate chain; with --tls-key serves TLS")
    parser.add_argument("--tls-key", type=Path, help="PEM private key for --tls-cert")
    parser.add_argument("--tls-client-ca", type=Path, help="PEM CA bundle: require client certificates (mutual TLS)")
    parser.add_argument("--auth-token-file", type=Path, help="accepted bearer tokens, one per line (health stays open)")
    parser.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics on this port (default off)")
    parser.add_argument("--health-port", type=int,
                        help="also serve gRPC health, plaintext and alone, on this port (for kubelet probes; default off)")
    parser.add_argument("--kserve", action="store_true", default=None,
                        help="also serve the KServe v2 API (model brainscan_pipeline) for perf_analyzer; default off")
    parser.add_argument("--log-format", choices=("json", "text"), help="log line format (default json)")
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    return parser


def main(argv: list[str] | None = None) -> int:
    from gateway.config import load_config
    from gateway.errors import BrainscanError
    from gateway.observability import configure_logging
    from gateway.server import serve

    args = build_parser().parse_args(argv)
    try:
        config = load_config(
            {
                "host": args.host,
                "port": args.port,
                "backend": args.backend,
                "model_repository": args.model_repository,
                "triton_url": args.triton_url,
                "max_in_flight": args.max_in_flight,
                "batch_max_size": args.batch_max_size,
                "batch_max_delay_ms": args.batch_max_delay_ms,
                "tls_cert": args.tls_cert,
                "tls_key": args.tls_key,
                "tls_client_ca": args.tls_client_ca,
                "auth_token_file": args.auth_token_file,
                "metrics_port": args.metrics_port,
                "health_port": args.health_port,
                "log_format": args.log_format,
                "kserve": args.kserve,
            }
        )
        configure_logging(args.log_level, config.log_format)
        print(DISCLAIMER, file=sys.stderr)
        asyncio.run(serve(config))
    except (BrainscanError, ValueError, OSError) as error:
        print(f"brainscan-server: {error}", file=sys.stderr)
        return 1
    return 0
