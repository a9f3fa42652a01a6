"""Embedded backend: ONNX Runtime sessions opened straight from model_repository/.

Models that batch (max_batch_size > 0) go through a `MicroBatcher`: requests
that arrive together share one session call (up to `batch_max_size` rows,
waiting at most `batch_max_delay_ms` for company; 0 turns batching off).
`batch_stats()` reports the batch sizes actually formed, per model.

On the CPU each model has two sessions: a wide one with every ORT thread and a
shared one with the cores split between the runs that may overlap. A run takes
the wide session when no other run is in flight, or when its model is the
slowest (the Mask R-CNN: it is the critical path); runs that overlap it take
the shared one. One run alone gets every core; overlapping runs do not
oversubscribe them, and a single-thread run does more work per core-second
(measured on 2 cores: classifier 5.0 ms with 2 threads vs 6.2 ms with 1, so
10 vs 6.2 core-ms).
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
import onnxruntime as ort

from gateway.batching import BatchStats, MicroBatcher
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

    def __init__(
        self,
        repository: Path,
        *,
        threads: int = 2,
        executor: ThreadPoolExecutor | None = None,
        batch_max_size: int = 8,
        batch_max_delay_ms: float = 2.0,
        concurrent: int = 0,
    ) -> None:
        self.repository = repository
        self.threads = threads
        self.batch_max_size = batch_max_size
        self.batch_max_delay_ms = batch_max_delay_ms
        self.specs: dict[str, ModelSpec] = {}
        self.stats: dict[str, BatchStats] = {}  # model role → batch sizes formed (metrics hook here)
        self._sessions: dict[str, dict[int, ort.InferenceSession]] = {}  # role → intra-op threads → session
        self._batchers: dict[str, MicroBatcher] = {}
        # ORT releases the GIL while it runs, so a thread pool keeps the event loop free. Two runs may
        # overlap: one run alone leaves gaps (thread hand-offs, no spinning) that the other fills.
        # Measured on 2 cores at concurrency 16: 27 images/s with two overlapping runs, 19-20 with one
        # (BRAINSCAN_ORT_CONCURRENT_RUNS overrides). The budget picks each run's session width.
        self._providers = _providers()
        runs = concurrent or concurrent_runs(threads, self._providers)
        self._executor = executor or ThreadPoolExecutor(max_workers=runs, thread_name_prefix="ort")
        shared = max(1, threads // runs) if "CUDAExecutionProvider" not in self._providers else threads
        self.budget = ThreadBudget(wide=threads, shared=shared)

    @property
    def batching(self) -> bool:
        return self.batch_max_size > 1 and self.batch_max_delay_ms > 0

    async def start(self) -> None:
        self.specs = load_repository(self.repository)
        warmup_s: dict[str, float] = {}
        for role, spec in self.specs.items():
            if not spec.onnx_path.is_file():
                raise ContractError(f"model {spec.name!r}: {spec.onnx_path} is missing")
            self._sessions[role] = {
                threads: _open_session(spec, threads, self._providers)
                for threads in sorted({self.budget.wide, self.budget.shared})
            }
            warmup = _warmup_inputs(spec)
            for threads, session in self._sessions[role].items():
                check_session_against_spec(session, spec)
                # A first run allocates ORT's buffers; do it now, not on a caller's request.
                started = time.perf_counter()
                session.run(None, warmup)
                if threads == self.budget.wide:
                    warmup_s[role] = time.perf_counter() - started
            self.stats[role] = BatchStats(model=role)
            if self.batching and spec.max_batch_size > 0:
                self._batchers[role] = MicroBatcher(
                    partial(self.run_session, role),
                    executor=self._executor,
                    max_batch=min(self.batch_max_size, spec.max_batch_size),
                    max_delay_s=self.batch_max_delay_ms / 1000.0,
                    stats=self.stats[role],
                )
        self.budget.slowest = max(warmup_s, key=warmup_s.__getitem__) if warmup_s else None

    async def infer(
        self, model: str, inputs: dict[str, np.ndarray], *, deadline: float | None = None
    ) -> dict[str, np.ndarray]:
        batcher = self._batchers.get(model)
        if batcher is not None:
            call = batcher.submit(inputs)
        else:
            call = self._run_direct(model, inputs)
        timeout_s = None if deadline is None else deadline - time.monotonic()
        try:
            return await asyncio.wait_for(call, timeout=timeout_s)
        except asyncio.TimeoutError:
            raise DeadlineExceeded(f"model {model!r} did not answer by the request's deadline") from None

    def run_session(self, model: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One blocking session call (any thread); every output the spec declares, by name."""
        output_names = [t.name for t in self.specs[model].outputs]
        threads = self.budget.take(model)
        try:
            return dict(zip(output_names, self._sessions[model][threads].run(output_names, inputs)))
        finally:
            self.budget.give(threads)

    def batch_stats(self) -> dict[str, dict[int, int]]:
        """model role → {batch size: batches run}, since start."""
        return {role: stats.histogram() for role, stats in self.stats.items()}

    async def _run_direct(self, model: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        spec = self.specs[model]
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        outputs = await loop.run_in_executor(self._executor, self.run_session, model, inputs)
        rows = int(next(iter(inputs.values())).shape[0]) if spec.max_batch_size > 0 else 1
        self.stats[model].record(rows, 1, time.perf_counter() - started)
        return outputs

    async def is_ready(self) -> bool:
        return bool(self._sessions) and len(self._sessions) == len(self.specs)

    async def close(self) -> None:
        for batcher in self._batchers.values():
            await batcher.close()
        self._batchers.clear()
        self._sessions.clear()
        self._executor.shutdown(wait=False, cancel_futures=True)


class ThreadBudget:
    """Which session (how many intra-op threads) a run starting now gets; thread-safe.

    `wide` when nothing else runs or the model is `slowest`, else `shared`.
    """

    def __init__(self, *, wide: int, shared: int) -> None:
        self.wide, self.shared = wide, shared
        self.slowest: str | None = None
        self._busy = 0
        self._lock = threading.Lock()

    def take(self, model: str) -> int:
        with self._lock:
            threads = self.wide if self._busy == 0 or model == self.slowest else self.shared
            self._busy += threads
            return threads

    def give(self, threads: int) -> None:
        with self._lock:
            self._busy -= threads


def _open_session(spec: ModelSpec, threads: int, providers: list[str]) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # No spin-waiting: several calls and the pre/post pool share the cores, and spinning
    # threads starve them (measured 1.6-2x slower per call on 2 busy cores).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(spec.onnx_path), options, providers=providers)


def _warmup_inputs(spec: ModelSpec) -> dict[str, np.ndarray]:
    """Deterministic noise of the size the gateway feeds (variable dims = input_size; batch of one)."""
    rng = np.random.default_rng(0)
    inputs = {}
    for tensor in spec.inputs:
        shape = tuple(spec.input_size if d < 0 else d for d in tensor.dims)
        if spec.max_batch_size > 0:
            shape = (1, *shape)
        inputs[tensor.name] = rng.random(shape).astype(tensor.dtype)
    return inputs


def concurrent_runs(threads: int, providers: list[str]) -> int:
    """How many session runs may overlap: at least two, more when the cores outnumber each run's threads (GPU: 4)."""
    if "CUDAExecutionProvider" in providers:
        return 4
    return max(2, (os.cpu_count() or 1) // max(1, threads))


def _providers() -> list[str]:
    """CUDA first when this ONNX Runtime build has it (onnxruntime-gpu on a GPU host), else the CPU."""
    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available] or ["CPUExecutionProvider"]


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
