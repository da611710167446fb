"""Training fast paths that keep the model's state dict: frozen BatchNorm+Scale as one affine op.

`FrozenBatchNormScale` evaluates Caffe's order (x - mean) / std * gamma + beta (four passes over the
activation, tightest fp32 parity). Training does not need that rounding: `FoldedBatchNormScale`
computes x * a + b with a = gamma / sqrt(var + eps), b = beta - mean * a (one fused pass), from the
same buffers under the same names, so snapshots keep the converted layout.
"""

from __future__ import annotations

import torch
from torch import nn

from models.caffe_layers import FrozenBatchNormScale


class FoldedBatchNormScale(FrozenBatchNormScale):
    """A `FrozenBatchNormScale` computing one multiply-add per element (per-channel factors from its buffers)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight / torch.sqrt(self.running_var + self.eps)
        shift = self.bias - self.running_mean * scale
        shape = (1, -1, 1, 1)
        return torch.addcmul(shift.to(x.dtype).reshape(shape), x, scale.to(x.dtype).reshape(shape))


def fold_frozen_batchnorm(model: nn.Module) -> int:
    """Turn every FrozenBatchNormScale of `model` into a FoldedBatchNormScale in place; returns how many.

    The buffers stay (same tensors, same keys): only the arithmetic changes.
    """
    count = 0
    for module in model.modules():
        if type(module) is FrozenBatchNormScale:
            module.__class__ = FoldedBatchNormScale
            count += 1
    return count
