"""DeepLab-v2's four training losses: Caffe's SoftmaxWithLoss (VALID normalisation) against shrunk labels.

SoftmaxWithLoss (BVLC `softmax_loss_layer.cpp`) with `ignore_label` and no normalization field uses
VALID: the sum of -log(max(p, FLT_MIN)) over non-ignored pixels divided by their count (at least 1),
per forward. With a batch of one image per forward (the release) that is per image; with batch > 1
this normalises each image by its own count and averages the images, so that the accumulated gradient
equals iter_size single-image forwards. The backward is Caffe's (p - onehot) / count, also where
the FLT_MIN floor clips the value.

The labels: `label_shrink` = Interp shrink 8, `label_shrink16` = Interp shrink 16 on the crop's label.
At crops 32k+1 Interp's sampling positions i*(H-1)/(h-1) are exactly every 8th / 16th pixel, so the
shrunk label is `label[::8, ::8]` with no blending (`shrink_label` refuses any other size).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from converter.errors import CaffeError
from models.deeplab import MSCOutputs
from segmentation.voc import IGNORE_LABEL

LOG_FLT_MIN = math.log(float(np.finfo(np.float32).tiny))  # Caffe's log(max(p, FLT_MIN)) floor
LABEL_SHRINK = 8  # label_shrink: the full, fused and upsampled 0.75 maps
LABEL_SHRINK16 = 16  # label_shrink16: the raw 0.5 map
LOSS_NAMES = ("loss", "loss_res1", "loss_res075", "loss_res05")  # the train prototxt's layer names


class DeepLabLosses(NamedTuple):
    """The four SoftmaxWithLoss terms of the train net, weight 1 each, named after its layers."""

    loss: torch.Tensor  # fc_fusion vs label_shrink
    loss_res1: torch.Tensor  # fc1 (full tower) vs label_shrink
    loss_res075: torch.Tensor  # fc1_res075_interp (0.75 tower upsampled) vs label_shrink
    loss_res05: torch.Tensor  # fc1_res05 (raw 0.5 tower) vs label_shrink16

    def total(self) -> torch.Tensor:
        return self.loss + self.loss_res1 + self.loss_res075 + self.loss_res05


def shrunk_size(size: int, factor: int) -> int:
    """Caffe's Interp shrink-only output size: (size - 1) // factor + 1."""
    return (size - 1) // factor + 1


def shrink_label(label: torch.Tensor, factor: int) -> torch.Tensor:
    """Interp(shrink_factor) of a label (..., H, W) where it samples exactly: every `factor`-th pixel.

    Caffe's Interp samples position i * (H-1)/(h-1); that is i * factor only when factor divides H-1.
    Other sizes would blend neighbouring label values (a bug of the Caffe net): refused.
    """
    height, width = label.shape[-2:]
    if (height - 1) % factor or (width - 1) % factor:
        raise CaffeError(
            f"label {height}x{width}: shrinking by {factor} samples exactly only when {factor} divides size-1 "
            "(crop 32k+1); other sizes would blend label values"
        )
    return label[..., ::factor, ::factor]


class _ValidSoftmaxLoss(torch.autograd.Function):
    """Per-image VALID SoftmaxWithLoss averaged over the batch, with Caffe's backward (p - onehot) / count."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, label: torch.Tensor, ignore_label: int) -> torch.Tensor:  # type: ignore[override]
        scores32 = scores.float()
        log_prob = F.log_softmax(scores32, dim=1)
        valid = label != ignore_label
        target = torch.where(valid, label, torch.zeros_like(label)).long()
        picked = log_prob.gather(1, target.unsqueeze(1)).squeeze(1).clamp(min=LOG_FLT_MIN)
        per_pixel = torch.where(valid, -picked, torch.zeros_like(picked))
        count = valid.flatten(1).sum(1).clamp(min=1).to(per_pixel.dtype)
        per_image = per_pixel.flatten(1).sum(1) / count
        ctx.save_for_backward(log_prob, target, valid, count)
        ctx.input_dtype = scores.dtype
        return per_image.mean()

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):  # type: ignore[override]
        log_prob, target, valid, count = ctx.saved_tensors
        grad = log_prob.exp()
        grad.scatter_add_(1, target.unsqueeze(1), -torch.ones_like(grad[:, :1]))
        grad.mul_(valid.unsqueeze(1))
        scale = grad_output / (count * count.numel())
        grad.mul_(scale.reshape(-1, 1, 1, 1))
        return grad.to(ctx.input_dtype), None, None


def softmax_loss_valid(scores: torch.Tensor, label: torch.Tensor, ignore_label: int = IGNORE_LABEL) -> torch.Tensor:
    """Caffe's SoftmaxWithLoss, VALID normalisation per image, averaged over the N images of (N, C, h, w) scores.

    `label` is (N, h, w) of class indices or `ignore_label`.
    """
    if scores.shape[0] != label.shape[0] or scores.shape[2:] != label.shape[1:]:
        raise ValueError(f"scores {tuple(scores.shape)} and label {tuple(label.shape)} do not match")
    return _ValidSoftmaxLoss.apply(scores, label, ignore_label)


def deeplab_losses(outputs: MSCOutputs, label: torch.Tensor, ignore_label: int = IGNORE_LABEL) -> DeepLabLosses:
    """The train net's four losses from the multi-scale outputs and the (N, H, W) crop label."""
    shrink8 = shrink_label(label, LABEL_SHRINK)
    shrink16 = shrink_label(label, LABEL_SHRINK16)
    return DeepLabLosses(
        loss=softmax_loss_valid(outputs.fused, shrink8, ignore_label),
        loss_res1=softmax_loss_valid(outputs.full, shrink8, ignore_label),
        loss_res075=softmax_loss_valid(outputs.scale075, shrink8, ignore_label),
        loss_res05=softmax_loss_valid(outputs.scale05, shrink16, ignore_label),
    )
