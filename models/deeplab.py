"""DeepLab-v2 ResNet-101 (ASPP), single- and multi-scale, exact to the Caffe release's nets.

Caffe details kept visible: the stride of a block sits on its first 1x1 conv (branch2a) and
on branch1; pool1 rounds up; res4/res5 use dilation 2/4 with stride 1 (output stride 8);
every BatchNorm+Scale pair is one frozen `FrozenBatchNormScale`; every ReLU position has
its own module so that a forward hook on it sees the Caffe blob's final value.

State-dict layout (torchvision-like; the same for `DeepLabV2` and `DeepLabV2MSC`):
`backbone.conv1.weight`, `backbone.bn1.*`, `backbone.layer{1..4}.{i}.conv{1,2,3}.weight`,
`backbone.layer{1..4}.{i}.bn{1,2,3}.*`, `backbone.layer{1..4}.0.downsample.{0,1}.*`,
`aspp.branches.{0..3}.{weight,bias}`, with `*` = weight, bias, running_mean, running_var.
layer1..layer4 are Caffe's res2..res5; `converter.deeplab.names.caffe_blob_taps` names the
module of every Caffe blob.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from models.alignment import (
    DATA_RES05,
    DATA_RES075,
    POOL1,
    RES05_INTERP,
    RES075_INTERP,
    STAGE_DILATIONS,
    STAGE_STRIDES,
    STEM_CONV,
    TEST_ZOOM,
    aligned_size,
    interp_axis_size,
    misalignment_message,
    prediction_input_size,
    score_size,
)
from models.caffe_layers import CaffeMaxPool2d, EltwiseMax, EltwiseSum, FrozenBatchNormScale
from models.interp import CaffeInterp, caffe_interp

ASPP_DILATIONS = (6, 12, 18, 24)
HEAD_WEIGHT_STD = 0.01  # Caffe's gaussian filler of the ASPP branches fc1_*_c{0..3} in the training nets


@dataclass(frozen=True)
class ResNetConfig:
    """Depth and width of the backbone: blocks per stage, stem width, bottleneck widths (out = 4x)."""

    blocks: tuple[int, int, int, int]
    stem_width: int
    widths: tuple[int, int, int, int]

    def __post_init__(self) -> None:
        object.__setattr__(self, "blocks", tuple(int(b) for b in self.blocks))
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
        if len(self.blocks) != 4 or len(self.widths) != 4:
            raise ValueError(f"ResNetConfig needs 4 stages, got blocks {self.blocks}, widths {self.widths}")
        if min(self.blocks + self.widths + (self.stem_width,)) < 1:
            raise ValueError(f"ResNetConfig sizes must be positive: {self}")

    @classmethod
    def resnet101(cls) -> ResNetConfig:
        """ResNet-101 as in the DeepLab-v2 release."""
        return cls(blocks=(3, 4, 23, 3), stem_width=64, widths=(64, 128, 256, 512))

    @classmethod
    def tiny(cls) -> ResNetConfig:
        """Same topology and names, two narrow blocks per stage: for fast tests."""
        return cls(blocks=(2, 2, 2, 2), stem_width=8, widths=(4, 8, 16, 32))

    @property
    def out_channels(self) -> int:
        """Channels of res5 (the input of the ASPP head)."""
        return 4 * self.widths[-1]


class Bottleneck(nn.Module):
    """A Caffe ResNet block: branch2a (1x1, carries the stride), 2b (3x3 dilated), 2c (1x1),
    plus branch1 (1x1 projection) on a stage's first block; relu(branch2c + shortcut)."""

    def __init__(
        self, in_channels: int, width: int, *, stride: int, dilation: int, projection: bool, bn_eps: float
    ) -> None:
        super().__init__()
        out_channels = 4 * width
        self.conv1 = nn.Conv2d(in_channels, width, 1, stride=stride, bias=False)
        self.bn1 = FrozenBatchNormScale(width, bn_eps)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width, width, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = FrozenBatchNormScale(width, bn_eps)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = FrozenBatchNormScale(out_channels, bn_eps)
        self.downsample = (
            nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                FrozenBatchNormScale(out_channels, bn_eps),
            )
            if projection
            else None
        )
        self.relu_out = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        # Out of place: the branch2c and branch1 values stay as Caffe leaves them (hooks hold them).
        return self.relu_out(out + shortcut)


class ResNetBackbone(nn.Module):
    """conv1-bn-relu, pool1 (ceil), res2..res5 with strides (1, 2, 1, 1) and dilations (1, 1, 2, 4)."""

    def __init__(self, config: ResNetConfig, bn_eps: float) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(
            3,
            config.stem_width,
            STEM_CONV["kernel"],
            stride=STEM_CONV["stride"],
            padding=STEM_CONV["pad"],
            bias=False,
        )
        self.bn1 = FrozenBatchNormScale(config.stem_width, bn_eps)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = CaffeMaxPool2d(POOL1["kernel"], POOL1["stride"], POOL1["pad"])
        in_channels = config.stem_width
        for layer, (count, width, stride, dilation) in enumerate(
            zip(config.blocks, config.widths, STAGE_STRIDES, STAGE_DILATIONS), start=1
        ):
            blocks = []
            for index in range(count):
                blocks.append(
                    Bottleneck(
                        in_channels,
                        width,
                        stride=stride if index == 0 else 1,
                        dilation=dilation,
                        projection=index == 0,
                        bn_eps=bn_eps,
                    )
                )
                in_channels = 4 * width
            self.add_module(f"layer{layer}", nn.Sequential(*blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class ASPPHead(nn.Module):
    """Four 3x3 convs with bias, dilation = pad = 6/12/18/24, summed left to right (Eltwise SUM)."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Conv2d(in_channels, num_classes, 3, padding=d, dilation=d, bias=True) for d in ASPP_DILATIONS
        )
        for conv in self.branches:  # Caffe's training fillers
            nn.init.normal_(conv.weight, std=HEAD_WEIGHT_STD)
            nn.init.zeros_(conv.bias)
        self.sum = EltwiseSum()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sum(*(branch(x) for branch in self.branches))


class DeepLabV2(nn.Module):
    """Single-scale DeepLab-v2: backbone + ASPP; returns the fc1 score map (stride 8)."""

    def __init__(
        self, num_classes: int = 21, config: ResNetConfig = ResNetConfig.resnet101(), bn_eps: float = 1e-5
    ) -> None:
        super().__init__()
        self.config = config
        self.num_classes = num_classes
        self.backbone = ResNetBackbone(config, bn_eps)
        self.aspp = ASPPHead(config.out_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.aspp(self.backbone(x))


class MSCOutputs(NamedTuple):
    """The multi-scale net's score maps (N, classes, h, w).

    full: fc1_voc12; scale075: fc1_voc12_res075_interp (the 0.75 tower upsampled to the full
    map's size); scale05: fc1_voc12_res05, the RAW 0.5 tower output (half size: the training
    loss compares it with the label shrunk by 16); fused: fc_fusion, the elementwise max of
    full, scale075 and the 0.5 output upsampled x2.
    """

    full: torch.Tensor
    scale075: torch.Tensor
    scale05: torch.Tensor
    fused: torch.Tensor


class DeepLabV2MSC(nn.Module):
    """Multi-scale DeepLab-v2: one DeepLabV2 run on the input, on its 0.75 and 0.5 resizes.

    Input: N,3,H,W, already mean-subtracted (BGR as in Caffe). The three towers share the
    parameters of `net`, whose modules are registered here directly, so the state dict has
    exactly DeepLabV2's keys. Towers run in the order full, res075, res05. `align` decides
    what happens when H or W does not align the fused maps (see models.alignment): "pad" pads
    with zeros to the next aligned size and crops the outputs back; "strict" raises ValueError,
    as Caffe fails. Forward hooks see the padded tensors.
    """

    def __init__(
        self,
        num_classes: int = 21,
        config: ResNetConfig = ResNetConfig.resnet101(),
        bn_eps: float = 1e-5,
        align: Literal["pad", "strict"] = "pad",
    ) -> None:
        super().__init__()
        if align not in ("pad", "strict"):
            raise ValueError(f"align must be 'pad' or 'strict', got {align!r}")
        self.align = align
        net = DeepLabV2(num_classes, config, bn_eps)
        self.config = config
        self.num_classes = num_classes
        self.backbone = net.backbone
        self.aspp = net.aspp
        # Kept out of the module tree: its modules are the two above, so no "net." keys appear.
        self.__dict__["_net"] = net
        self.data_res075 = CaffeInterp(**DATA_RES075)
        self.data_res05 = CaffeInterp(**DATA_RES05)
        self.fc1_voc12_res075_interp = CaffeInterp(**RES075_INTERP)
        self.fc1_voc12_res05_interp = CaffeInterp(**RES05_INTERP)
        self.fc_fusion = EltwiseMax()

    @property
    def net(self) -> DeepLabV2:
        """The shared single-scale network (same modules and parameters as this model)."""
        return self._net

    def forward(self, x: torch.Tensor) -> MSCOutputs:
        height, width = x.shape[-2:]
        padded_height, padded_width = aligned_size(height), aligned_size(width)
        padded = (padded_height, padded_width) != (height, width)
        if padded:
            if self.align == "strict":
                raise ValueError(misalignment_message(height, width))
            x = F.pad(x, (0, padded_width - width, 0, padded_height - height))
        full = self.net(x)
        res075 = self.net(self.data_res075(x))
        res05 = self.net(self.data_res05(x))
        scale075 = self.fc1_voc12_res075_interp(res075)
        fused = self.fc_fusion(full, scale075, self.fc1_voc12_res05_interp(res05))
        if not padded:
            return MSCOutputs(full, scale075, res05, fused)
        rows, cols = score_size(height), score_size(width)
        rows05 = score_size(interp_axis_size(height, DATA_RES05))
        cols05 = score_size(interp_axis_size(width, DATA_RES05))
        return MSCOutputs(
            full[..., :rows, :cols], scale075[..., :rows, :cols], res05[..., :rows05, :cols05], fused[..., :rows, :cols]
        )


@torch.no_grad()
def predict_scores(
    model: DeepLabV2MSC | DeepLabV2, image: torch.Tensor, *, pad_to: tuple[int, int] | None = None
) -> torch.Tensor:
    """Class scores (N, classes, H, W) at the input's resolution, as DeepLab's test net makes them.

    The mean-subtracted N,3,H,W `image` is padded with zeros (the mean) at the bottom/right to
    `pad_to` (H, W) when given, as the release's evaluation pads every VOC image to 513x513 (the
    scaled towers then see the same sizes Caffe's did), else to `prediction_input_size`; run (the
    fused map for the multi-scale model), zoomed x8 by Caffe's Interp (fc1_interp: h + 7(h-1))
    and cropped to H x W, like the test net's fc1_interp followed by the evaluation's crop.
    """
    height, width = image.shape[-2:]
    if pad_to is None:
        pad_to = (prediction_input_size(height), prediction_input_size(width))
    elif pad_to[0] < height or pad_to[1] < width:
        raise ValueError(f"pad_to {pad_to[0]}x{pad_to[1]} is smaller than the image {height}x{width}")
    out = model(F.pad(image, (0, pad_to[1] - width, 0, pad_to[0] - height)))
    scores = out.fused if isinstance(out, MSCOutputs) else out
    zoomed_height = interp_axis_size(scores.shape[-2], TEST_ZOOM)
    zoomed_width = interp_axis_size(scores.shape[-1], TEST_ZOOM)
    return caffe_interp(scores, zoomed_height, zoomed_width)[..., :height, :width]


def predict_labels(
    model: DeepLabV2MSC | DeepLabV2, image: torch.Tensor, *, pad_to: tuple[int, int] | None = None
) -> torch.Tensor:
    """Per-pixel class indices (N, H, W, int64): the argmax of `predict_scores`."""
    return predict_scores(model, image, pad_to=pad_to).argmax(dim=1)
