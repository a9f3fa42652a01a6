"""Triton Python-backend `model.py` that serves one ONNX file with ONNX Runtime.

`triton_local` copies this file as `<model>/<version>/model.py` into a
shim repository next to a link to the model's `model.onnx`. It only runs inside
Triton's Python-backend stub, which provides `triton_python_backend_utils`;
nothing else in the gateway imports it.

- The session is built once, in `initialize`: CUDA provider when the instance
  is a GPU instance and ONNX Runtime has it, else the CPU provider.
- Intra-op threads come from the config parameter `intra_op_thread_count`
  (the native onnxruntime backend's name for it), default 1. Threads sleep
  when idle instead of spinning: the three models' instances share the cores.
- Output dtypes are read from the model config, never hard-coded.
- `execute` runs a whole batch of requests in one session call when the model
  batches (max_batch_size > 0) and their shapes agree; a failing request gets
  its own error response without failing its neighbours.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils  # provided by the Python-backend stub

ONNX_FILE = "model.onnx"


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        self.name = config["name"]
        self.batching = int(config.get("max_batch_size", 0)) > 0
        self.input_names = [tensor["name"] for tensor in config["input"]]
        self.input_dtypes = {
            tensor["name"]: pb_utils.triton_string_to_numpy(tensor["data_type"]) for tensor in config["input"]
        }
        self.output_dtypes = {
            tensor["name"]: pb_utils.triton_string_to_numpy(
                pb_utils.get_output_config_by_name(config, tensor["name"])["data_type"]
            )
            for tensor in config["output"]
        }
        parameters = config.get("parameters", {})
        threads = int(parameters.get("intra_op_thread_count", {}).get("string_value", "1") or 1)

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers: list = ["CPUExecutionProvider"]
        if args.get("model_instance_kind") == "GPU" and "CUDAExecutionProvider" in ort.get_available_providers():
            device_id = int(args.get("model_instance_device_id", 0))
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": device_id}))
        path = Path(args["model_repository"]) / args["model_version"] / ONNX_FILE
        self.session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        self.output_names = list(self.output_dtypes)
        pb_utils.Logger.log_info(
            f"{self.name}: ONNX Runtime session on {self.session.get_providers()[0]}, "
            f"{threads} intra-op thread(s), file {path}"
        )

    def execute(self, requests: list) -> list:
        feeds = [self._feeds(request) for request in requests]
        if self.batching and len(requests) > 1 and _same_item_shapes(feeds):
            try:
                return self._run_batched(feeds)
            except Exception:  # fall back so one bad request cannot fail the others
                pass
        return [self._run_one(feed) for feed in feeds]

    def finalize(self) -> None:
        self.session = None

    # --- internals ---------------------------------------------------------

    def _feeds(self, request) -> dict[str, np.ndarray]:
        return {
            name: pb_utils.get_input_tensor_by_name(request, name).as_numpy().astype(
                self.input_dtypes[name], copy=False
            )
            for name in self.input_names
        }

    def _run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(self.output_names, feed)

    def _response(self, outputs: list[np.ndarray]):
        tensors = [
            pb_utils.Tensor(name, np.ascontiguousarray(value.astype(self.output_dtypes[name], copy=False)))
            for name, value in zip(self.output_names, outputs)
        ]
        return pb_utils.InferenceResponse(output_tensors=tensors)

    def _run_one(self, feed: dict[str, np.ndarray]):
        try:
            return self._response(self._run(feed))
        except Exception as exc:  # ORT raises several types; the client gets the message
            shapes = {name: list(value.shape) for name, value in feed.items()}
            return pb_utils.InferenceResponse(
                error=pb_utils.TritonError(f"model {self.name!r} failed on inputs {shapes}: {exc}")
            )

    def _run_batched(self, feeds: list[dict[str, np.ndarray]]) -> list:
        sizes = [next(iter(feed.values())).shape[0] for feed in feeds]
        merged = {name: np.concatenate([feed[name] for feed in feeds]) for name in self.input_names}
        outputs = self._run(merged)
        bounds = np.cumsum([0, *sizes])
        return [
            self._response([value[start:stop] for value in outputs])
            for start, stop in zip(bounds[:-1], bounds[1:])
        ]


def _same_item_shapes(feeds: list[dict[str, np.ndarray]]) -> bool:
    first = feeds[0]
    return all(
        feed[name].shape[1:] == first[name].shape[1:] for feed in feeds[1:] for name in first
    )
