"""Inference speed-up for evaluation: BatchNorm+Scale folded into the preceding convolutions' weights and bias.

Unlike training's `fold_frozen_batchnorm` (segmentation/train_speed.py: one multiply-add per element, the
parameters untouched), this removes the normalisation entirely; it changes results only by float rounding.
"""

from __future__ import annotations

import torch
from torch import nn

from models.caffe_layers import FrozenBatchNormScale


@torch.no_grad()
def _folded_conv(conv: nn.Conv2d, norm: FrozenBatchNormScale) -> nn.Conv2d:
    """conv followed by norm as one conv: W' = W g / s, b' = (b - mean) g / s + beta, computed in float64."""
    std = torch.sqrt(norm.running_var.double() + norm.eps)
    factor = norm.weight.double() / std
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(factor)
    folded = nn.Conv2d(
        conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
        dilation=conv.dilation, groups=conv.groups, bias=True,
    ).to(device=conv.weight.device, dtype=conv.weight.dtype)
    folded.weight.copy_(conv.weight.double() * factor.reshape(-1, 1, 1, 1))
    folded.bias.copy_((bias - norm.running_mean.double()) * factor + norm.bias.double())
    return folded


def fold_batchnorm_into_convs(model: nn.Module) -> int:
    """Fold every FrozenBatchNormScale into the Conv2d registered just before it in the same parent (the order
    in which DeepLabV2 applies them), in place; the norm becomes Identity. Returns how many were folded.

    Inference only: the state dict changes (folded convs gain a bias), so never save the model as a checkpoint.
    """
    folded = 0
    for parent in list(model.modules()):
        children = list(parent.named_children())
        for (conv_name, conv), (norm_name, norm) in zip(children, children[1:]):
            if isinstance(conv, nn.Conv2d) and isinstance(norm, FrozenBatchNormScale):
                setattr(parent, conv_name, _folded_conv(conv, norm))
                setattr(parent, norm_name, nn.Identity())
                folded += 1
    return folded
