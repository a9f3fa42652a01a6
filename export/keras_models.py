"""Keras 3 model builders for the classifier and the U-Net.

Both take the gateway's tensor as is (`image`, S×S×1 float32 in [0, 1]) and
name their output layer after the contract (`probabilities`, `mask`), so the
ONNX graph carries the contract's tensor names without renaming.
"""

from __future__ import annotations

import keras
from keras import layers

INPUT_NAME = "image"
OUTPUT_NAMES = {"classifier": "probabilities", "unet": "mask"}
NUM_CLASSES = 4


def _conv_bn_act(x, filters: int, *, stride: int = 1, kernel: int = 3, name: str):
    x = layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=False, name=f"{name}_conv")(x)
    x = layers.BatchNormalization(name=f"{name}_bn")(x)
    return layers.Activation("swish", name=f"{name}_act")(x)


def _squeeze_excite(x, filters: int, *, name: str, ratio: int = 4):
    s = layers.GlobalAveragePooling2D(keepdims=True, name=f"{name}_se_pool")(x)
    s = layers.Conv2D(max(8, filters // ratio), 1, activation="swish", name=f"{name}_se_reduce")(s)
    s = layers.Conv2D(filters, 1, activation="sigmoid", name=f"{name}_se_expand")(s)
    return layers.Multiply(name=f"{name}_se")([x, s])


def _residual_block(x, filters: int, *, stride: int, name: str):
    shortcut = x
    y = _conv_bn_act(x, filters, stride=stride, name=f"{name}_a")
    y = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_b_conv")(y)
    y = layers.BatchNormalization(name=f"{name}_b_bn")(y)
    y = _squeeze_excite(y, filters, name=name)
    if stride != 1 or shortcut.shape[-1] != filters:
        if stride != 1:
            shortcut = layers.AveragePooling2D(stride, padding="same", name=f"{name}_down")(shortcut)
        shortcut = layers.Conv2D(filters, 1, use_bias=False, name=f"{name}_proj")(shortcut)
        shortcut = layers.BatchNormalization(name=f"{name}_proj_bn")(shortcut)
    return layers.Activation("swish", name=f"{name}_out")(layers.Add(name=f"{name}_add")([y, shortcut]))


def build_classifier(
    size: int,
    *,
    widths: tuple[int, ...] = (24, 32, 64, 128),
    depths: tuple[int, ...] = (1, 1, 2, 2),
    dropout: float = 0.3,
) -> keras.Model:
    """Small residual CNN with squeeze-excitation: stride-2 stem, one stride-2 stage per width."""
    inputs = keras.Input((size, size, 1), name=INPUT_NAME)
    x = layers.Rescaling(2.0, offset=-1.0, name="center")(inputs)
    x = _conv_bn_act(x, widths[0], stride=2, name="stem")
    for stage, (width, depth) in enumerate(zip(widths, depths)):
        for block in range(depth):
            stride = 2 if block == 0 and stage > 0 else 1
            x = _residual_block(x, width, stride=stride, name=f"s{stage}b{block}")
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    x = layers.Dropout(dropout, name="dropout")(x)
    logits = layers.Dense(NUM_CLASSES, name="logits")(x)
    outputs = layers.Activation("softmax", name=OUTPUT_NAMES["classifier"])(logits)
    return keras.Model(inputs, outputs, name="classifier")


def build_unet(size: int, *, base: int = 16, levels: int = 4, dropout: float = 0.1) -> keras.Model:
    """Plain U-Net (two conv-BN-swish per level, bilinear up + concat), sigmoid mask output."""
    inputs = keras.Input((size, size, 1), name=INPUT_NAME)
    x = layers.Rescaling(2.0, offset=-1.0, name="center")(inputs)
    skips = []
    for level in range(levels):
        filters = base * 2**level
        x = _conv_bn_act(x, filters, name=f"enc{level}a")
        x = _conv_bn_act(x, filters, name=f"enc{level}b")
        skips.append(x)
        x = layers.MaxPooling2D(2, name=f"pool{level}")(x)
    x = _conv_bn_act(x, base * 2**levels, name="mid_a")
    x = layers.SpatialDropout2D(dropout, name="mid_dropout")(x)
    x = _conv_bn_act(x, base * 2**levels, name="mid_b")
    for level in reversed(range(levels)):
        filters = base * 2**level
        x = layers.UpSampling2D(2, interpolation="bilinear", name=f"up{level}")(x)
        x = layers.Concatenate(name=f"cat{level}")([x, skips[level]])
        x = _conv_bn_act(x, filters, name=f"dec{level}a")
        x = _conv_bn_act(x, filters, name=f"dec{level}b")
    x = layers.Conv2D(1, 1, name="mask_logits")(x)
    outputs = layers.Activation("sigmoid", name=OUTPUT_NAMES["unet"])(x)
    return keras.Model(inputs, outputs, name="unet")


def build(model: str, size: int, **kwargs) -> keras.Model:
    if model == "classifier":
        return build_classifier(size, **kwargs)
    if model == "unet":
        return build_unet(size, **kwargs)
    raise ValueError(f"unknown model {model!r}; expected classifier or unet")
