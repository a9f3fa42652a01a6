"""Embedded backend: ONNX Runtime sessions opened straight from model_repository/."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort

from gateway.contract import ModelSpec, load_repository
from gateway.errors import ContractError, DeadlineExceeded

_ORT_TYPES = {
    "tensor(float)": np.dtype(np.float32),
    "tensor(float16)": np.dtype(np.float16),
    "tensor(int64)": np.dtype(np.int64),
    "tensor(int32)": np.dtype(np.int32),
    "tensor(uint8)": np.dtype(np.uint8),
    "tensor(bool)": np.dtype(np.bool_),
}


class EmbeddedBackend:
    kind = "embedded"

    def __init__(self, repository: Path, *, threads: int = 2, executor: ThreadPoolExecutor | None = None) -> None:
        self.repository = repository
        self.threads = threads
        self.specs: dict[str, ModelSpec] = {}
        self._sessions: dict[str, ort.InferenceSession] = {}
        # ORT releases the GIL while it runs, so a thread pool keeps the event loop free.
        self._executor = executor or ThreadPoolExecutor(max_workers=max(2, threads), thread_name_prefix="ort")

    async def start(self) -> None:
        self.specs = load_repository(self.repository)
        for role, spec in self.specs.items():
            if not spec.onnx_path.is_file():
                raise ContractError(f"model {spec.name!r}: {spec.onnx_path} is missing")
            options = ort.SessionOptions()
            options.intra_op_num_threads = self.threads
            options.inter_op_num_threads = 1
            session = ort.InferenceSession(str(spec.onnx_path), options, providers=["CPUExecutionProvider"])
            check_session_against_spec(session, spec)
            self._sessions[role] = session

    async def infer(
        self, model: str, inputs: dict[str, np.ndarray], *, timeout_s: float | None = None
    ) -> dict[str, np.ndarray]:
        session = self._sessions[model]
        spec = self.specs[model]
        output_names = [t.name for t in spec.outputs]
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._executor, session.run, output_names, inputs)
        try:
            values = await asyncio.wait_for(future, timeout=timeout_s)
        except asyncio.TimeoutError:
            raise DeadlineExceeded(f"model {model!r} did not answer within {timeout_s:.3f} s") from None
        return dict(zip(output_names, values))

    async def is_ready(self) -> bool:
        return bool(self._sessions) and len(self._sessions) == len(self.specs)

    async def close(self) -> None:
        self._sessions.clear()
        self._executor.shutdown(wait=False, cancel_futures=True)


def check_session_against_spec(session: ort.InferenceSession, spec: ModelSpec) -> None:
    """The ONNX graph must have exactly the tensors the config promises."""
    batched = spec.max_batch_size > 0
    for kind, declared, actual in (
        ("input", spec.inputs, session.get_inputs()),
        ("output", spec.outputs, session.get_outputs()),
    ):
        by_name = {node.name: node for node in actual}
        for tensor in declared:
            node = by_name.get(tensor.name)
            where = f"model {spec.name!r} ({spec.onnx_path})"
            if node is None:
                raise ContractError(
                    f"{where}: config.pbtxt declares {kind} {tensor.name!r}, the ONNX graph has {sorted(by_name)}"
                )
            onnx_dtype = _ORT_TYPES.get(node.type)
            if onnx_dtype != tensor.dtype:
                raise ContractError(
                    f"{where}: {kind} {tensor.name!r} is {tensor.triton_dtype} in config.pbtxt but {node.type} in ONNX"
                )
            shape = list(node.shape)
            if batched:
                shape = shape[1:]
            if len(shape) != len(tensor.dims):
                raise ContractError(
                    f"{where}: {kind} {tensor.name!r} has dims {list(tensor.dims)} in config.pbtxt "
                    f"but shape {list(node.shape)} in ONNX"
                )
            for declared_dim, onnx_dim in zip(tensor.dims, shape):
                if declared_dim > 0 and isinstance(onnx_dim, int) and onnx_dim != declared_dim:
                    raise ContractError(
                        f"{where}: {kind} {tensor.name!r} has dims {list(tensor.dims)} in config.pbtxt "
                        f"but shape {list(node.shape)} in ONNX"
                    )
