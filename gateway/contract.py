"""The model contract: `model_repository/<name>/config.pbtxt` → typed model specs.

Each config is parsed with protobuf's text format into Triton's own
`ModelConfig` message; everything else (the gateway, both backends, the
Triton shim builder, export's re-parse check) reads the contract from here.

Roles the gateway needs, and the tensors each must carry:

    classifier  image [S, S, 1] FP32 → probabilities [C] FP32 (+ labels file)
    unet        image [S, S, 1] FP32 → mask [S, S, 1] FP32 (tumor probability)
    maskrcnn    image [1, -1, -1] FP32 → boxes [-1, 4], scores [-1], masks [-1, 1, -1, -1]
                (no batch dimension; parameter `input_size` = the square side the
                gateway feeds it)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from gateway.errors import ContractError

DISCLAIMER = "Research use only. Not a medical device; not for diagnosis or treatment decisions."

CONFIG_FILE = "config.pbtxt"
LABELS_FILE = "labels.txt"
MODEL_FILE = "model.onnx"

_DTYPES: dict[int, np.dtype] = {
    mc.TYPE_FP32: np.dtype(np.float32),
    mc.TYPE_FP16: np.dtype(np.float16),
    mc.TYPE_INT64: np.dtype(np.int64),
    mc.TYPE_INT32: np.dtype(np.int32),
    mc.TYPE_UINT8: np.dtype(np.uint8),
    mc.TYPE_BOOL: np.dtype(np.bool_),
}
_TRITON_TYPE_NAMES = {v: mc.DataType.Name(k) for k, v in _DTYPES.items()}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: np.dtype
    dims: tuple[int, ...]  # without the batch dimension; -1 = variable

    @property
    def triton_dtype(self) -> str:
        """KServe/Triton wire name, e.g. FP32."""
        return _TRITON_TYPE_NAMES[self.dtype].removeprefix("TYPE_")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    version: str
    max_batch_size: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    directory: Path
    labels: tuple[str, ...] = ()
    parameters: dict[str, str] = field(default_factory=dict)

    @property
    def onnx_path(self) -> Path:
        return self.directory / self.version / MODEL_FILE

    def input(self, name: str) -> TensorSpec:
        return _find(self.inputs, name, self.name, "input")

    def output(self, name: str) -> TensorSpec:
        return _find(self.outputs, name, self.name, "output")

    @property
    def input_size(self) -> int:
        """Square side of the image the gateway prepares for this model."""
        if "input_size" in self.parameters:
            return int(self.parameters["input_size"])
        dims = self.input("image").dims
        return int(dims[0])


# role → (input tensors, output tensors) with the rank each must have (batch excluded)
REQUIRED_TENSORS: dict[str, tuple[dict[str, int], dict[str, int]]] = {
    "classifier": ({"image": 3}, {"probabilities": 1}),
    "unet": ({"image": 3}, {"mask": 3}),
    "maskrcnn": ({"image": 3}, {"boxes": 2, "scores": 1, "masks": 4}),
}


def parse_config(path: Path) -> mc.ModelConfig:
    """Parse one config.pbtxt into Triton's ModelConfig, with a clear error on bad text."""
    try:
        return text_format.Parse(path.read_text(), mc.ModelConfig())
    except (OSError, text_format.ParseError) as exc:
        raise ContractError(f"{path}: not a valid Triton model config: {exc}") from None


def load_model_spec(model_dir: Path) -> ModelSpec:
    config_path = model_dir / CONFIG_FILE
    if not config_path.is_file():
        raise ContractError(f"{model_dir}: missing {CONFIG_FILE}")
    config = parse_config(config_path)
    if config.name != model_dir.name:
        raise ContractError(
            f"{config_path}: config name {config.name!r} differs from its folder {model_dir.name!r}"
        )
    inputs = tuple(_tensor(t, config_path) for t in config.input)
    outputs = tuple(_tensor(t, config_path) for t in config.output)
    labels: tuple[str, ...] = ()
    for out in config.output:
        if out.label_filename:
            labels_path = model_dir / out.label_filename
            if not labels_path.is_file():
                raise ContractError(f"{config_path}: labels file {labels_path} is missing")
            labels = tuple(line.strip() for line in labels_path.read_text().splitlines() if line.strip())
    version = _latest_version(model_dir)
    parameters = {key: value.string_value for key, value in config.parameters.items()}
    return ModelSpec(
        name=config.name,
        version=version,
        max_batch_size=int(config.max_batch_size),
        inputs=inputs,
        outputs=outputs,
        directory=model_dir,
        labels=labels,
        parameters=parameters,
    )


def load_repository(repository: Path, roles: tuple[str, ...] = tuple(REQUIRED_TENSORS)) -> dict[str, ModelSpec]:
    """Load and validate the specs of every role the gateway needs."""
    if not repository.is_dir():
        raise ContractError(f"model repository {repository} does not exist")
    specs = {}
    for role in roles:
        spec = load_model_spec(repository / role)
        validate_role(spec, role)
        specs[role] = spec
    return specs


def validate_role(spec: ModelSpec, role: str) -> None:
    wanted_inputs, wanted_outputs = REQUIRED_TENSORS[role]
    for kind, wanted, tensors in (("input", wanted_inputs, spec.inputs), ("output", wanted_outputs, spec.outputs)):
        by_name = {t.name: t for t in tensors}
        for name, rank in wanted.items():
            if name not in by_name:
                raise ContractError(
                    f"model {spec.name!r}: expected {kind} {name!r}, config has {sorted(by_name)}"
                )
            if len(by_name[name].dims) != rank:
                raise ContractError(
                    f"model {spec.name!r}: {kind} {name!r} expected rank {rank} (batch excluded), "
                    f"config has dims {list(by_name[name].dims)}"
                )
    if role == "classifier":
        classes = spec.output("probabilities").dims[0]
        if len(spec.labels) != classes:
            raise ContractError(
                f"model {spec.name!r}: {classes} output classes but {len(spec.labels)} labels"
            )
        if "no_tumor" not in spec.labels:
            raise ContractError(f"model {spec.name!r}: labels {spec.labels} lack 'no_tumor'")
    if role == "maskrcnn" and "input_size" not in spec.parameters:
        raise ContractError(f"model {spec.name!r}: config lacks parameter 'input_size'")


def _tensor(tensor: mc.ModelInput | mc.ModelOutput, config_path: Path) -> TensorSpec:
    if tensor.data_type not in _DTYPES:
        raise ContractError(
            f"{config_path}: tensor {tensor.name!r} has unsupported type {mc.DataType.Name(tensor.data_type)}"
        )
    return TensorSpec(name=tensor.name, dtype=_DTYPES[tensor.data_type], dims=tuple(int(d) for d in tensor.dims))


def _latest_version(model_dir: Path) -> str:
    versions = sorted((int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()))
    if not versions:
        raise ContractError(f"{model_dir}: no numbered version folder (e.g. {model_dir}/1/)")
    return str(versions[-1])


def _find(tensors: tuple[TensorSpec, ...], name: str, model: str, kind: str) -> TensorSpec:
    for tensor in tensors:
        if tensor.name == name:
            return tensor
    raise ContractError(f"model {model!r} has no {kind} {name!r}")


def triton_data_type(dtype: np.dtype) -> int:
    """numpy dtype → Triton DataType enum (used by export's config writer)."""
    for enum, np_dtype in _DTYPES.items():
        if np_dtype == np.dtype(dtype):
            return enum
    raise ContractError(f"dtype {dtype} has no Triton equivalent here")
