"""Triton backend: the models served by one or more Triton servers.

`url` lists the servers (gateway/config.py `triton_targets`): `host:port`
entries, comma-separated, and/or `dns:///name:port`, which stands for every
address the name resolves to (re-resolved every few seconds, as a Kubernetes
headless Service adds and drops pods). Each address is an endpoint with its own
channel.

The same repository the gateway reads (`model_repository/`) is the contract:
an endpoint takes calls only after it was checked to serve every model with
exactly those tensors (names, datatypes, shapes, max_batch_size), and is
checked again whenever it comes back after being away.

Endpoints are probed every `probe_interval_s` (server and every model ready);
one that refuses a probe or answers a call with UNAVAILABLE is out of rotation
at once, one whose probes time out twice in a row too, and either is back after
its next good probe. Calls go to the ready endpoint
with the fewest calls in flight (round robin among equals). A call answered
UNAVAILABLE (server gone, connection reset) is retried on another ready
endpoint straight away, or after exponential backoff when none is, at most
`max_retries` times and only inside the caller's deadline. `is_ready()` is
true while any endpoint is ready.

Triton status → domain error:

    UNAVAILABLE, NOT_FOUND, INTERNAL, …  → BackendUnavailable
    DEADLINE_EXCEEDED (or no time left)  → DeadlineExceeded
    INVALID_ARGUMENT, bad input tensors  → ContractError
    RESOURCE_EXHAUSTED (queue full)      → Overloaded
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tritonclient.grpc import InferInput, InferRequestedOutput
from tritonclient.grpc.aio import InferenceServerClient
from tritonclient.utils import InferenceServerException

from gateway.config import DNS_SCHEME, triton_targets
from gateway.contract import ModelSpec, TensorSpec, load_repository
from gateway.errors import BackendUnavailable, BrainscanError, ContractError, DeadlineExceeded, Overloaded

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 2**31 - 1  # Mask R-CNN returns full-size masks per detection
SLOW_PROBES_TO_TAKE_OUT = 2  # probes in a row that time out before a server leaves the rotation


@dataclass(eq=False)
class Endpoint:
    """One Triton server address and what the backend knows about it."""

    url: str
    client: InferenceServerClient
    source: str  # the --triton-url target it comes from (a dns:/// name stands for several)
    ready: bool = False
    verified: bool = False  # contract checked since it last came up
    in_flight: int = 0
    calls: int = 0  # answered calls
    slow_probes: int = 0  # probes in a row that timed out


class TritonBackend:
    kind = "triton"

    def __init__(
        self,
        url: str,
        repository: Path,
        *,
        max_retries: int = 3,
        backoff_s: float = 0.05,
        max_backoff_s: float = 1.0,
        startup_wait_s: float = 30.0,
        health_timeout_s: float = 1.0,
        probe_interval_s: float = 1.0,
        resolve_interval_s: float = 5.0,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
    ) -> None:
        self.url = url
        self.targets = triton_targets(url)
        self.repository = Path(repository)
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.startup_wait_s = startup_wait_s
        self.health_timeout_s = health_timeout_s
        self.probe_interval_s = probe_interval_s
        self.resolve_interval_s = resolve_interval_s
        self.max_message_bytes = max_message_bytes
        self.specs: dict[str, ModelSpec] = load_repository(self.repository)
        self.endpoints: dict[str, Endpoint] = {}  # by url
        self._retired: list[Endpoint] = []  # dropped from DNS, closed once idle
        self._turn = itertools.count()
        self._monitor: asyncio.Task | None = None

    # --- lifecycle ---------------------------------------------------------

    async def start(self) -> None:
        """Open the channels, wait (bounded) until one Triton is ready, check the contract, start probing.

        A reachable Triton that serves different models raises ContractError: the
        gateway refuses to start rather than leave a misconfigured server unnoticed.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.startup_wait_s
        while True:
            await self._resolve()
            if any(await asyncio.gather(*(self._probe(e, strict=True) for e in self._pool()))):
                break
            if loop.time() >= deadline:
                raise BackendUnavailable(
                    f"Triton at {self.url} is not ready after {self.startup_wait_s:.0f} s "
                    f"(models {sorted(s.name for s in self.specs.values())}); is tritonserver running? "
                    "Start one with `python -m triton_local`."
                )
            await asyncio.sleep(0.5)
        if self._monitor is None:
            self._monitor = asyncio.create_task(self._watch())

    async def close(self) -> None:
        if self._monitor is not None:
            self._monitor.cancel()
            self._monitor = None
        endpoints, self.endpoints = [*self.endpoints.values(), *self._retired], {}
        self._retired = []
        for endpoint in endpoints:
            await endpoint.client.close()

    async def is_ready(self) -> bool:
        """Probe every endpoint now; true while at least one serves every model under the contract."""
        if not self.endpoints:
            return False
        return any(await asyncio.gather(*(self._probe(e) for e in self._pool())))

    # --- inference ---------------------------------------------------------

    async def infer(
        self, model: str, inputs: dict[str, np.ndarray], *, deadline: float | None = None
    ) -> dict[str, np.ndarray]:
        if model not in self.specs:
            raise ContractError(f"unknown model {model!r}; the repository has {sorted(self.specs)}")
        if not self.endpoints:
            raise BackendUnavailable(f"Triton backend for {self.url} is not started")
        spec = self.specs[model]
        request = [_infer_input(spec, tensor, inputs) for tensor in spec.inputs]
        extra = sorted(set(inputs) - {t.name for t in spec.inputs})
        if extra:
            raise ContractError(f"model {spec.name!r} has no input(s) {extra}; it takes {[t.name for t in spec.inputs]}")
        outputs = [InferRequestedOutput(t.name) for t in spec.outputs]
        tried: list[str] = []
        attempt = 0
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise DeadlineExceeded(f"model {spec.name!r}: no time left for Triton by the request's deadline")
            endpoint = self._pick(tried)
            endpoint.in_flight += 1
            try:
                result = await endpoint.client.infer(spec.name, request, outputs=outputs, client_timeout=remaining)
                endpoint.calls += 1
                break
            except InferenceServerException as exc:
                tried.append(endpoint.url)
                if _status(exc) != "UNAVAILABLE":
                    raise self._error(exc, spec, tried) from None
                self._take_out(endpoint, exc.message())
                if attempt >= self.max_retries:
                    raise self._error(exc, spec, tried) from None
                log.debug("model %r: Triton %s answered UNAVAILABLE (%s); retrying", spec.name, endpoint.url, exc.message())
                # another ready endpoint: go now; none: give the servers a moment
                delay = 0.0 if self._ready_besides(tried) else min(self.backoff_s * 2**attempt, self.max_backoff_s)
                if deadline is not None and time.monotonic() + delay >= deadline:
                    raise self._error(exc, spec, tried) from None
                attempt += 1
                await asyncio.sleep(delay)
            finally:
                endpoint.in_flight -= 1
        return {t.name: _output(result, spec, t) for t in spec.outputs}

    # --- endpoints ---------------------------------------------------------

    def _pool(self) -> list[Endpoint]:
        return list(self.endpoints.values())

    def _pick(self, tried: list[str]) -> Endpoint:
        """Fewest in flight among the ready endpoints not tried yet by this call (round robin among equals).

        With none ready, an untried endpoint still gets the call: the last probe may be stale.
        """
        pool = self._pool()
        ready = [e for e in pool if e.ready]
        candidates = (
            [e for e in ready if e.url not in tried] or ready or [e for e in pool if e.url not in tried] or pool
        )
        shift = next(self._turn) % len(candidates)
        rotated = candidates[shift:] + candidates[:shift]
        return min(rotated, key=lambda e: e.in_flight)

    def _ready_besides(self, tried: list[str]) -> bool:
        return any(e.ready and e.url not in tried for e in self._pool())

    def _take_out(self, endpoint: Endpoint, reason: str) -> None:
        endpoint.verified = False
        if endpoint.ready:
            endpoint.ready = False
            log.warning("Triton %s out of rotation (%s); %d of %d ready",
                        endpoint.url, reason, sum(e.ready for e in self._pool()), len(self.endpoints))

    def _put_back(self, endpoint: Endpoint) -> None:
        if not endpoint.ready and endpoint.url in self.endpoints:
            endpoint.ready = True
            log.info("Triton %s in rotation; %d of %d ready",
                     endpoint.url, sum(e.ready for e in self._pool()), len(self.endpoints))

    async def _probe(self, endpoint: Endpoint, *, strict: bool = False) -> bool:
        """Server and every model ready, contract checked (again after a return); updates the rotation.

        `strict`: a contract mismatch raises ContractError instead of keeping the endpoint out.
        """
        timeout = self.health_timeout_s
        client = endpoint.client
        try:
            checks = [client.is_server_ready(client_timeout=timeout)]
            checks += [client.is_model_ready(s.name, client_timeout=timeout) for s in self.specs.values()]
            up = all(await asyncio.gather(*checks))
        except InferenceServerException as exc:
            status = _status(exc)
            endpoint.slow_probes += status == "DEADLINE_EXCEEDED"
            # a refused connection is certain; one slow answer on a busy host is not
            if status != "DEADLINE_EXCEEDED" or endpoint.slow_probes >= SLOW_PROBES_TO_TAKE_OUT:
                self._take_out(endpoint, f"probe: {status or exc.message()}")
            return False
        endpoint.slow_probes = 0
        if not up:
            self._take_out(endpoint, "server or a model not ready")
            return False
        if not endpoint.verified:
            try:
                await self._check_contract(endpoint)
            except ContractError as exc:
                if strict:
                    raise
                self._take_out(endpoint, "contract mismatch")
                log.error("Triton at %s is up but not usable: %s", endpoint.url, exc)
                return False
            except BackendUnavailable as exc:
                self._take_out(endpoint, str(exc))
                return False
        self._put_back(endpoint)
        return True

    async def _watch(self) -> None:
        """Probe every endpoint each `probe_interval_s`; re-resolve DNS targets each `resolve_interval_s`."""
        loop = asyncio.get_running_loop()
        next_resolve = loop.time() + self.resolve_interval_s
        while True:
            await asyncio.sleep(self.probe_interval_s)
            try:
                if loop.time() >= next_resolve:
                    next_resolve = loop.time() + self.resolve_interval_s
                    await self._resolve()
                await asyncio.gather(*(self._probe(e) for e in self._pool()))
            except Exception:  # the watcher must outlive any one bad probe
                log.exception("probing the Triton endpoints failed")

    async def _resolve(self) -> None:
        """Bring the endpoint set in line with the targets (DNS names looked up again)."""
        wanted: dict[str, str] = {}  # url → the target it comes from
        for target in self.targets:
            if not target.startswith(DNS_SCHEME):
                wanted.setdefault(target, target)
                continue
            # a failed or empty lookup keeps what the name gave before; the probes decide
            addresses = await self._lookup(target) or [e.url for e in self._pool() if e.source == target]
            for url in addresses:
                wanted.setdefault(url, target)
        for url, source in wanted.items():
            if url not in self.endpoints:
                client = InferenceServerClient(url, channel_args=self._channel_args())
                self.endpoints[url] = Endpoint(url, client, source=source)
        for url in [u for u in self.endpoints if u not in wanted]:
            endpoint = self.endpoints.pop(url)
            endpoint.ready = False
            log.info("Triton %s no longer resolved; dropped", url)
            self._retired.append(endpoint)
        for endpoint in [e for e in self._retired if e.in_flight == 0]:
            self._retired.remove(endpoint)
            await endpoint.client.close()

    async def _lookup(self, target: str) -> list[str]:
        host, _, port = target.removeprefix(DNS_SCHEME).rpartition(":")
        host = host.strip("[]")
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
        except OSError as exc:
            log.warning("cannot resolve Triton target %s: %s", target, exc)
            return []
        urls = []
        for family, _, _, _, sockaddr in infos:
            ip = str(sockaddr[0])
            url = f"[{ip}]:{port}" if family == socket.AF_INET6 else f"{ip}:{port}"
            if url not in urls:
                urls.append(url)
        return urls

    def _channel_args(self) -> list[tuple[str, int]]:
        return [
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_receive_message_length", self.max_message_bytes),
            # reconnect quickly once Triton is back (gRPC's default backoff grows to minutes)
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
        ]

    async def _check_contract(self, endpoint: Endpoint) -> None:
        for spec in self.specs.values():
            try:
                metadata = await endpoint.client.get_model_metadata(spec.name, as_json=True)
                config = (await endpoint.client.get_model_config(spec.name, as_json=True))["config"]
            except InferenceServerException as exc:
                raise BackendUnavailable(
                    f"Triton at {endpoint.url}: cannot read model {spec.name!r}: {exc.message()}"
                ) from None
            try:
                check_served_model(spec, metadata, config)
            except ContractError as exc:
                raise ContractError(f"Triton at {endpoint.url}: {exc}") from None
        endpoint.verified = True

    def _error(
        self, exc: InferenceServerException, spec: ModelSpec, tried: list[str]
    ) -> BrainscanError:
        status, message = _status(exc), exc.message()
        where = f"model {spec.name!r} on Triton at {tried[-1]}"
        if status == "DEADLINE_EXCEEDED":
            return DeadlineExceeded(f"{where} did not answer by the request's deadline")
        if status == "INVALID_ARGUMENT":
            return ContractError(f"{where} refused the request: {message}")
        if status == "RESOURCE_EXHAUSTED":
            return Overloaded(f"{where} is overloaded: {message}")
        if status == "UNAVAILABLE":
            servers = ", ".join(dict.fromkeys(tried))
            return BackendUnavailable(
                f"{where} is unavailable after {len(tried)} attempt(s) (tried {servers}): {message}"
            )
        return BackendUnavailable(f"{where} failed ({status}): {message}")


def check_served_model(spec: ModelSpec, metadata: dict, config: dict) -> None:
    """Raise ContractError unless Triton serves `spec` exactly (metadata and config as JSON)."""
    where = f"model {spec.name!r}"
    served_batch = int(config.get("max_batch_size", 0))
    if served_batch != spec.max_batch_size:
        raise ContractError(
            f"{where}: repository says max_batch_size {spec.max_batch_size}, Triton serves {served_batch}"
        )
    if spec.version not in metadata.get("versions", []):
        raise ContractError(
            f"{where}: repository version {spec.version} is not served by Triton (it serves {metadata.get('versions')})"
        )
    batch = [-1] if spec.max_batch_size > 0 else []
    for kind, declared, served in (
        ("input", spec.inputs, metadata.get("inputs", [])),
        ("output", spec.outputs, metadata.get("outputs", [])),
    ):
        by_name = {t["name"]: t for t in served}
        for tensor in declared:
            actual = by_name.get(tensor.name)
            if actual is None:
                raise ContractError(f"{where}: expected {kind} {tensor.name!r}, Triton serves {sorted(by_name)}")
            expected_shape = batch + list(tensor.dims)
            actual_shape = [int(d) for d in actual.get("shape", [])]
            if actual["datatype"] != tensor.triton_dtype or actual_shape != expected_shape:
                raise ContractError(
                    f"{where} {kind} {tensor.name!r}: repository says {tensor.triton_dtype} {expected_shape}, "
                    f"Triton serves {actual['datatype']} {actual_shape}"
                )


def _infer_input(spec: ModelSpec, tensor: TensorSpec, inputs: dict[str, np.ndarray]) -> InferInput:
    """Check one input against the contract (naming expected and actual) and wrap it for Triton."""
    where = f"model {spec.name!r} input {tensor.name!r}"
    if tensor.name not in inputs:
        raise ContractError(f"{where} is missing; got inputs {sorted(inputs)}")
    value = inputs[tensor.name]
    if not isinstance(value, np.ndarray) or value.dtype != tensor.dtype:
        actual = value.dtype if isinstance(value, np.ndarray) else type(value).__name__
        raise ContractError(f"{where}: expected {tensor.triton_dtype} ({tensor.dtype}), got {actual}")
    batched = spec.max_batch_size > 0
    expected = ([-1] if batched else []) + list(tensor.dims)
    shape = list(value.shape)
    if len(shape) != len(expected) or any(e > 0 and e != a for e, a in zip(expected, shape)):
        raise ContractError(f"{where}: expected shape {expected} (-1 = any), got {shape}")
    if batched and not 0 < shape[0] <= spec.max_batch_size:
        raise ContractError(f"{where}: batch of {shape[0]} outside 1..{spec.max_batch_size} (max_batch_size)")
    wrapped = InferInput(tensor.name, shape, tensor.triton_dtype)
    wrapped.set_data_from_numpy(np.ascontiguousarray(value))
    return wrapped


def _output(result: object, spec: ModelSpec, tensor: TensorSpec) -> np.ndarray:
    value = result.as_numpy(tensor.name)  # type: ignore[attr-defined]
    if value is None:
        raise ContractError(f"model {spec.name!r}: Triton's answer lacks output {tensor.name!r}")
    return value


def _status(exc: InferenceServerException) -> str:
    """'StatusCode.UNAVAILABLE' → 'UNAVAILABLE' ('' for client-side errors)."""
    return (exc.status() or "").removeprefix("StatusCode.")
