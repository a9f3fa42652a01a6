"""The one backend interface; `embedded` (ONNX Runtime in-process) and `triton`
(tritonclient.grpc.aio) implement it, and the pipeline never knows which it has."""

from __future__ import annotations

from typing import Protocol

import numpy as np

from gateway.contract import ModelSpec


class Backend(Protocol):
    """Runs the models of one repository.

    `infer` takes and returns tensors by name as the model contract lays them
    out: with a leading batch dimension when the model's max_batch_size > 0,
    without one otherwise. It returns every output the spec declares. It raises
    `BackendUnavailable` when the model server cannot be reached and
    `DeadlineExceeded` when `deadline` passes: the request's absolute deadline on
    time.monotonic() (gateway.request_clock), None for none.
    """

    kind: str  # "embedded" or "triton"
    specs: dict[str, ModelSpec]

    async def start(self) -> None:
        """Load and validate every model; raise ContractError on a mismatch."""

    async def infer(
        self, model: str, inputs: dict[str, np.ndarray], *, deadline: float | None = None
    ) -> dict[str, np.ndarray]: ...

    async def is_ready(self) -> bool: ...

    async def close(self) -> None: ...
