"""Keras 3 model builders for the classifier and the U-Net.

Both are built on EfficientNet-Lite0 with ported ImageNet weights
(`export.efficientnet_lite`). Both take the gateway's tensor as is (`image`, S×S×1 float32 in [0, 1]) and
name their output layer after the contract (`probabilities`, `mask`), so the
ONNX graph carries the contract's tensor names without renaming.
"""

from __future__ import annotations

import keras
from keras import layers

INPUT_NAME = "image"
OUTPUT_NAMES = {"classifier": "probabilities", "unet": "mask"}
# The classifier's second output: p(the slice is a brain MRI the models can judge).
SCOPE_OUTPUT = "in_scope"
# Every output tensor of each model, the contract's primary one first.
MODEL_OUTPUTS = {"classifier": (OUTPUT_NAMES["classifier"], SCOPE_OUTPUT), "unet": (OUTPUT_NAMES["unet"],)}


def named_outputs(keras_model, model: str, image, *, training: bool = False) -> dict:
    """The model's outputs keyed by contract name (the U-Net returns one tensor, the classifier a dict)."""
    out = keras_model(image, training=training)
    if isinstance(out, dict):
        return {name: out[name] for name in MODEL_OUTPUTS[model]}
    return {MODEL_OUTPUTS[model][0]: out}
NUM_CLASSES = 4


def _conv_bn_act(x, filters: int, *, stride: int = 1, kernel: int = 3, name: str):
    x = layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=False, name=f"{name}_conv")(x)
    x = layers.BatchNormalization(name=f"{name}_bn")(x)
    return layers.Activation("swish", name=f"{name}_act")(x)


def build_classifier(size: int, *, pretrained: bool = True, dropout: float = 0.2, drop_connect: float = 0.1,
                     temperature: float = 1.0) -> keras.Model:
    """EfficientNet-Lite0 (ImageNet weights unless `pretrained=False`) with two heads.

    `probabilities`: softmax over CLASS_LABELS of the logits divided by
    `temperature` (fitted on validation data at export; 1 while training).
    `in_scope`: sigmoid p(the slice is a brain MRI the models can judge),
    trained against head CTs and synthetic non-MRI frames.
    """
    from export.efficientnet_lite import PIXEL_MEAN, PIXEL_STD, keras_encoder, port_to_keras

    inputs = keras.Input((size, size, 1), name=INPUT_NAME)
    # Gray in [0, 1] -> the Lite models' (v*255 - 127) / 128; the stem's RGB kernels are summed for one channel.
    x = layers.Rescaling(255.0 / PIXEL_STD, offset=-PIXEL_MEAN / PIXEL_STD, name="normalize")(inputs)
    features = keras_encoder(x, with_head=True, dropout_connect=drop_connect)
    pooled = layers.GlobalAveragePooling2D(name="pool")(features[-1])
    pooled = layers.Dropout(dropout, name="dropout")(pooled)
    logits = layers.Dense(NUM_CLASSES, name="logits")(pooled)
    scaled = layers.Rescaling(1.0 / temperature, name="temperature")(logits)
    probabilities = layers.Activation("softmax", name=OUTPUT_NAMES["classifier"])(scaled)
    scope_logit = layers.Dense(1, name="scope_logit")(pooled)
    in_scope = layers.Activation("sigmoid", name=SCOPE_OUTPUT)(scope_logit)
    model = keras.Model(inputs, {OUTPUT_NAMES["classifier"]: probabilities, SCOPE_OUTPUT: in_scope}, name="classifier")
    if pretrained:
        port_to_keras(model, with_head=True)
    return model


def build_unet(size: int, *, pretrained: bool = True, decoder: tuple[int, ...] = (96, 64, 48, 24),
               dropout: float = 0.1) -> keras.Model:
    """U-Net on the EfficientNet-Lite0 encoder: skips at strides 16, 8, 4 and 2, bilinear up-sampling.

    The decoder stops at stride 2 and the mask logits are up-sampled bilinearly to the input
    grid: a full-resolution decoder level cost more than the whole encoder on the CPU.
    """
    from export.efficientnet_lite import PIXEL_MEAN, PIXEL_STD, keras_encoder, port_to_keras

    inputs = keras.Input((size, size, 1), name=INPUT_NAME)
    x = layers.Rescaling(255.0 / PIXEL_STD, offset=-PIXEL_MEAN / PIXEL_STD, name="normalize")(inputs)
    features = keras_encoder(x)
    x = layers.SpatialDropout2D(dropout, name="bottom_dropout")(features[-1])
    skips = list(reversed(features[:-1]))
    for level, (filters, skip) in enumerate(zip(decoder, skips)):
        x = layers.UpSampling2D(2, interpolation="bilinear", name=f"up{level}")(x)
        x = layers.Concatenate(name=f"cat{level}")([x, skip])
        x = _conv_bn_act(x, filters, name=f"dec{level}a")
        if level < len(decoder) - 1:
            x = _conv_bn_act(x, filters, name=f"dec{level}b")
    x = layers.Conv2D(1, 1, name="mask_logits")(x)
    x = layers.UpSampling2D(2, interpolation="bilinear", name="up_logits")(x)
    outputs = layers.Activation("sigmoid", name=OUTPUT_NAMES["unet"])(x)
    model = keras.Model(inputs, outputs, name="unet")
    if pretrained:
        port_to_keras(model, with_head=False)
    return model


def build(model: str, size: int, **kwargs) -> keras.Model:
    if model == "classifier":
        return build_classifier(size, **kwargs)
    if model == "unet":
        return build_unet(size, **kwargs)
    raise ValueError(f"unknown model {model!r}; expected classifier or unet")
