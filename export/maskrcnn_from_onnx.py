"""Recover a Mask R-CNN's PyTorch weights from its exported ONNX file, to fine-tune a shipped model.

`runs/` is not committed, so a fresh clone has no checkpoint, only
`model_repository/maskrcnn/1/model.onnx`. The export keeps every conv, linear
and transposed-conv parameter under its PyTorch name ("model." + state-dict
key), but folds each normalization into anonymous constants:

- a FrozenBatchNorm2d (the encoder) becomes `Mul(scale)` then `Add(shift)` on
  its conv's output, with scale = w / sqrt(var + eps) and shift = b - mean * scale.
  Loading weight = scale, bias = shift, mean = 0, var = 1 - eps gives back the
  same function;
- a GroupNorm (FPN, mask head) becomes InstanceNormalization between reshapes,
  then `Mul(weight)` and `Add(bias)`.

Each norm module's constants are found by the ONNX node names, which carry
the module path ("/model/backbone/fpn/inner_blocks.0/inner_blocks.0.1/Mul"):
the first Mul with a per-channel constant under its scope, then the first
such Add after it. `python -m export train maskrcnn --init model.onnx` uses this.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

ONNX_PREFIX = "model."  # MaskRCNNExportWrapper keeps the network as `.model`
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def state_dict_from_onnx(model: nn.Module, onnx_path: Path) -> dict[str, torch.Tensor]:
    """A state dict for `model` (same architecture as the exported one) with the ONNX file's weights."""
    import onnx
    from onnx import numpy_helper
    from torchvision.ops.misc import FrozenBatchNorm2d

    graph = onnx.load(str(onnx_path)).graph
    constants = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)

    state = {key: value.clone() for key, value in model.state_dict().items()}
    for key in state:
        if ONNX_PREFIX + key in constants:
            state[key] = torch.from_numpy(constants[ONNX_PREFIX + key].copy()).reshape(state[key].shape)
    missing = []
    for name, module in model.named_modules():
        if not isinstance(module, (FrozenBatchNorm2d, nn.GroupNorm)):
            continue
        channels = state[f"{name}.weight"].numel()
        scale, shift = _affine_constants(graph.node, _onnx_scope(model, name) + "/", constants, channels)
        if scale is None or shift is None:
            missing.append(name)
            continue
        state[f"{name}.weight"], state[f"{name}.bias"] = torch.from_numpy(scale), torch.from_numpy(shift)
        if isinstance(module, FrozenBatchNorm2d):
            state[f"{name}.running_mean"] = torch.zeros(channels)
            state[f"{name}.running_var"] = torch.full((channels,), 1.0 - module.eps)
    if missing:
        raise ValueError(f"{onnx_path}: no folded constants found for {len(missing)} norm layers, e.g. {missing[:3]}")
    return state


def _onnx_scope(model: nn.Module, name: str) -> str:
    """The node-name scope the exporter gives module `name`: one component per module that runs forward
    (not a ModuleList/ModuleDict), a container's children named "<container label>.<index>"."""
    components, labels, parent = [], [], model
    for part in name.split("."):
        child = parent._modules[part]
        label = f"{labels[-1]}.{part}" if labels and isinstance(parent, _CONTAINERS) else part
        labels.append(label)
        if not isinstance(child, (nn.ModuleList, nn.ModuleDict)):
            components.append(label)
        parent = child
    return "/" + ONNX_PREFIX.rstrip(".") + "/" + "/".join(components)


def _affine_constants(nodes, scope: str, constants: dict[str, np.ndarray], channels: int):
    """The per-channel constants of the first Mul under `scope` and of the first Add after it."""
    scale = None
    for node in nodes:
        if not node.name.startswith(scope) or node.op_type not in ("Mul", "Add"):
            continue
        operand = next((constants[i] for i in node.input if i in constants and constants[i].size == channels), None)
        if operand is None:
            continue
        if node.op_type == "Mul" and scale is None:
            scale = operand.astype(np.float32).reshape(-1).copy()
        elif node.op_type == "Add" and scale is not None:
            return scale, operand.astype(np.float32).reshape(-1).copy()
    return scale, None
