"""Triton backend: the models served by a Triton server, over one gRPC channel.

The same repository the gateway reads (`model_repository/`) is the contract;
`start()` checks that Triton serves every model with exactly those tensors
(names, datatypes, shapes, max_batch_size), and re-checks whenever Triton comes
back after being away. Calls carry a timeout derived from the caller's
deadline; UNAVAILABLE is retried a bounded number of times with exponential
backoff, inside that deadline.

Triton status → domain error:

    UNAVAILABLE, NOT_FOUND, INTERNAL, …  → BackendUnavailable
    DEADLINE_EXCEEDED (or no time left)  → DeadlineExceeded
    INVALID_ARGUMENT, bad input tensors  → ContractError
    RESOURCE_EXHAUSTED (queue full)      → Overloaded
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import numpy as np
from tritonclient.grpc import InferInput, InferRequestedOutput
from tritonclient.grpc.aio import InferenceServerClient
from tritonclient.utils import InferenceServerException

from gateway.contract import ModelSpec, TensorSpec, load_repository
from gateway.errors import BackendUnavailable, BrainscanError, ContractError, DeadlineExceeded, Overloaded

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 2**31 - 1  # Mask R-CNN returns full-size masks per detection


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
        max_message_bytes: int = MAX_MESSAGE_BYTES,
    ) -> None:
        self.url = url
        self.repository = Path(repository)
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.startup_wait_s = startup_wait_s
        self.health_timeout_s = health_timeout_s
        self.max_message_bytes = max_message_bytes
        self.specs: dict[str, ModelSpec] = load_repository(self.repository)
        self._client: InferenceServerClient | None = None
        self._verified = False  # contract checked against the Triton we talk to now

    # --- lifecycle ---------------------------------------------------------

    async def start(self) -> None:
        """Open the channel, wait (bounded) for Triton, and check every model against the contract."""
        if self._client is None:
            self._client = InferenceServerClient(self.url, channel_args=self._channel_args())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.startup_wait_s
        while not await self._models_ready():
            if loop.time() >= deadline:
                raise BackendUnavailable(
                    f"Triton at {self.url} is not ready after {self.startup_wait_s:.0f} s "
                    f"(models {sorted(s.name for s in self.specs.values())}); is tritonserver running? "
                    "Start one with `brainscan triton`."
                )
            await asyncio.sleep(0.5)
        await self._check_contract()

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None
        self._verified = False

    async def is_ready(self) -> bool:
        """Server and every model ready; a Triton that came back is re-checked against the contract."""
        if self._client is None or not await self._models_ready():
            self._verified = False
            return False
        if not self._verified:
            try:
                await self._check_contract()
            except BrainscanError as exc:
                log.error("Triton at %s is up but not usable: %s", self.url, exc)
                return False
        return True

    # --- inference ---------------------------------------------------------

    async def infer(
        self, model: str, inputs: dict[str, np.ndarray], *, timeout_s: float | None = None
    ) -> dict[str, np.ndarray]:
        if model not in self.specs:
            raise ContractError(f"unknown model {model!r}; the repository has {sorted(self.specs)}")
        if self._client is None:
            raise BackendUnavailable(f"Triton backend for {self.url} is not started")
        spec = self.specs[model]
        request = [_infer_input(spec, tensor, inputs) for tensor in spec.inputs]
        extra = sorted(set(inputs) - {t.name for t in spec.inputs})
        if extra:
            raise ContractError(f"model {spec.name!r} has no input(s) {extra}; it takes {[t.name for t in spec.inputs]}")
        outputs = [InferRequestedOutput(t.name) for t in spec.outputs]
        loop = asyncio.get_running_loop()
        deadline = None if timeout_s is None else loop.time() + timeout_s
        attempt = 0
        while True:
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                raise DeadlineExceeded(f"model {spec.name!r}: no time left for Triton (timeout {timeout_s:.3f} s)")
            try:
                result = await self._client.infer(spec.name, request, outputs=outputs, client_timeout=remaining)
                break
            except InferenceServerException as exc:
                delay = min(self.backoff_s * 2**attempt, self.max_backoff_s)
                retry = _status(exc) == "UNAVAILABLE" and attempt < self.max_retries
                if retry and (deadline is None or loop.time() + delay < deadline):
                    attempt += 1
                    self._verified = False
                    await asyncio.sleep(delay)
                    continue
                raise self._error(exc, spec, attempt + 1, timeout_s) from None
        return {t.name: _output(result, spec, t) for t in spec.outputs}

    # --- internals ---------------------------------------------------------

    def _channel_args(self) -> list[tuple[str, int]]:
        return [
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_receive_message_length", self.max_message_bytes),
            # reconnect quickly once Triton is back (gRPC's default backoff grows to minutes)
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
        ]

    async def _models_ready(self) -> bool:
        assert self._client is not None
        timeout = self.health_timeout_s
        try:
            checks = [self._client.is_server_ready(client_timeout=timeout)]
            checks += [self._client.is_model_ready(s.name, client_timeout=timeout) for s in self.specs.values()]
            return all(await asyncio.gather(*checks))
        except InferenceServerException:
            return False

    async def _check_contract(self) -> None:
        assert self._client is not None
        for spec in self.specs.values():
            try:
                metadata = await self._client.get_model_metadata(spec.name, as_json=True)
                config = (await self._client.get_model_config(spec.name, as_json=True))["config"]
            except InferenceServerException as exc:
                raise BackendUnavailable(f"Triton at {self.url}: cannot read model {spec.name!r}: {exc.message()}") from None
            check_served_model(spec, metadata, config)
        self._verified = True

    def _error(
        self, exc: InferenceServerException, spec: ModelSpec, attempts: int, timeout_s: float | None
    ) -> BrainscanError:
        status, message = _status(exc), exc.message()
        where = f"model {spec.name!r} on Triton at {self.url}"
        if status == "DEADLINE_EXCEEDED":
            return DeadlineExceeded(f"{where} did not answer within {timeout_s:.3f} s")
        if status == "INVALID_ARGUMENT":
            return ContractError(f"{where} refused the request: {message}")
        if status == "RESOURCE_EXHAUSTED":
            return Overloaded(f"{where} is overloaded: {message}")
        if status == "UNAVAILABLE":
            return BackendUnavailable(f"{where} is unavailable after {attempts} attempt(s): {message}")
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
