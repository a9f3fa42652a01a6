"""The SDK over several gateways: a target naming many addresses spreads calls round robin.

Two real embedded gateways on loopback; which one answered is read from each
gateway's own Prometheus counters.
"""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path

from brainscan import Client
from tests.conftest import start_gateway, stop_gateway


def answered(metrics_url: str, method: str) -> float:
    """Finished calls of `method` that a gateway counted (brainscan_requests_total, every status code)."""
    with urllib.request.urlopen(metrics_url, timeout=5) as reply:
        lines = reply.read().decode().splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines
               if line.startswith("brainscan_requests_total{") and method in line)


def test_calls_spread_over_every_gateway_a_target_names(tiny_repository: Path, tmp_path: Path) -> None:
    # one gateway closes connections after 1 s (--max-connection-age): clients reconnect without failing a call
    gateways = [
        start_gateway(tiny_repository, tmp_path, extra=["--metrics-port", "0"], env=env)
        for env in ({}, {"BRAINSCAN_MAX_CONNECTION_AGE_S": "1"})
    ]
    try:
        metrics = [
            f"http://127.0.0.1:{g.log().split('metrics on :')[1].split('/metrics')[0]}/metrics" for g in gateways
        ]
        ports = [g.address.rsplit(":", 1)[1] for g in gateways]
        with Client(f"ipv4:127.0.0.1:{ports[0]},127.0.0.1:{ports[1]}", timeout_s=10) as client:
            client.model_info()  # both connections up before counting
            before = [answered(url, "GetModelInfo") for url in metrics]
            for _ in range(20):
                client.model_info()
        counts = [answered(url, "GetModelInfo") - b for url, b in zip(metrics, before)]
        print(f"\nGetModelInfo calls answered by each gateway: {counts}")
        assert sum(counts) == 20 and min(counts) >= 5, counts

        with Client(f"dns:///localhost:{ports[1]}", timeout_s=10) as client:  # outlives the 1 s connection age
            infos = [client.model_info() for _ in range(3)]
            time.sleep(1.5)
            infos += [client.model_info() for _ in range(3)]
        assert all(info.backend == "embedded" for info in infos)
    finally:
        for gateway in gateways:
            stop_gateway(gateway)
