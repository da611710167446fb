"""Caffe layers whose behaviour differs from PyTorch's defaults, written so the difference shows.

- `FrozenBatchNormScale`: a Caffe BatchNorm (use_global_stats) followed by its Scale layer,
  fixed statistics and affine, same arithmetic order as Caffe.
- `CaffeMaxPool2d`: MAX pooling with Caffe's ceil rounding of the output size.
- `EltwiseMax`: Caffe's Eltwise MAX, which requires equal shapes (no broadcasting).
- `EltwiseSum`: Caffe's Eltwise SUM with optional coefficients, summed left to right.
- `caffe_batch_norm`: BatchNorm's arithmetic, shared by FrozenBatchNormScale and the registry.
- `conv_output_size`, `caffe_pool_output_size`: Caffe's output-size formulas.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn


def conv_output_size(size: int, kernel: int, stride: int = 1, pad: int = 0, dilation: int = 1) -> int:
    """Caffe's (and PyTorch's) convolution output size along one axis: floor rounding."""
    return (size + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1


def caffe_pool_output_size(size: int, kernel: int, stride: int, pad: int) -> int:
    """Caffe's pooling output size along one axis: ceil rounding, then drop a last window
    that would start in the bottom/right padding (Caffe's `(out-1)*stride >= size+pad` rule)."""
    out = math.ceil((size + 2 * pad - kernel) / stride) + 1
    if pad and (out - 1) * stride >= size + pad:
        out -= 1
    return out


class SameShape:
    """Mixin for layers whose output has the first input's shape: the layer registry infers
    shapes from `output_shapes` without running anything."""

    def output_shapes(self, *shapes: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
        return (tuple(shapes[0]),)


def caffe_batch_norm(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, eps: float) -> torch.Tensor:
    """Caffe BatchNorm with given statistics on axis 1: (x - mean) / sqrt(var + eps), in that order.

    var + eps in the statistics' dtype as Caffe adds it; the square root correctly rounded
    (float64, then rounded): torch.sqrt on float32 CPU can be 1 ulp off IEEE sqrtf.
    """
    shape = (1, -1) + (1,) * (x.dim() - 2)
    std = torch.sqrt((var + eps).double()).to(x.dtype).reshape(shape)
    return (x - mean.to(x.dtype).reshape(shape)) / std


class FrozenBatchNormScale(nn.Module):
    """Caffe BatchNorm (global statistics) + Scale (gamma, beta) with everything fixed.

    y = (x - mean) / sqrt(var + eps) * gamma + beta, evaluated in that order: Caffe's BatchNorm
    subtracts the mean and divides by sqrt(var + eps), then its Scale layer multiplies by gamma
    and adds beta. Multiplying by a folded gamma / sqrt(var + eps) instead would be cheaper but
    rounds differently in float32, so fp32 parity with Caffe is tightest in this order.
    All four tensors are buffers: nothing is trained and `train()` changes nothing (the Caffe
    layers run with use_global_stats and lr_mult 0). `mean`/`var` are already divided by
    Caffe's moving-average factor. The per-channel vectors are cast to the input's dtype.
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1, 1, 1)
        gamma = self.weight.to(x.dtype).reshape(shape)
        beta = self.bias.to(x.dtype).reshape(shape)
        return caffe_batch_norm(x, self.running_mean, self.running_var, self.eps) * gamma + beta

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


class CaffeMaxPool2d(nn.MaxPool2d):
    """MAX pooling with Caffe's output size: ceil rounding with the last-window clip.

    PyTorch's `ceil_mode=True` applies the same rule as Caffe (see `caffe_pool_output_size`;
    the tests pin it at sizes where ceil and floor differ). Padded cells never win the max,
    as in Caffe, whose windows are clipped to the image.
    """

    def __init__(self, kernel_size: int, stride: int, padding: int) -> None:
        super().__init__(kernel_size, stride=stride, padding=padding, ceil_mode=True)


class _EltwiseMaxFirst(torch.autograd.Function):
    """Caffe's Eltwise MAX with its backward: the whole gradient goes to the FIRST maximal input.

    eltwise_layer.cpp keeps a mask: input 0, then input k replaces the running max only when
    strictly greater; the backward routes each element's gradient to the masked input.
    `torch.maximum` splits ties between inputs instead (ties are common in bf16).
    """

    @staticmethod
    def forward(ctx, *inputs: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out = inputs[0]
        winner = torch.zeros(out.shape, dtype=torch.uint8, device=out.device)
        for index, other in enumerate(inputs[1:], start=1):
            greater = other > out
            out = torch.where(greater, other, out)
            winner = torch.where(greater, index, winner)
        ctx.save_for_backward(winner)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (winner,) = ctx.saved_tensors
        return tuple(torch.where(winner == index, grad, 0) for index in range(len(ctx.needs_input_grad)))


class EltwiseMax(SameShape, nn.Module):
    """Caffe Eltwise MAX: the elementwise maximum of inputs that must have identical shapes.

    With gradients on, the backward is Caffe's: the first maximal input takes the gradient.
    """

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        shapes = [tuple(t.shape) for t in inputs]
        if len(set(shapes)) != 1:
            raise ValueError(f"Eltwise MAX needs inputs of one shape, got {shapes}")
        if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
            return _EltwiseMaxFirst.apply(*inputs)
        out = inputs[0]
        for other in inputs[1:]:
            out = torch.maximum(out, other)
        return out


class EltwiseSum(SameShape, nn.Module):
    """Caffe Eltwise SUM: coeff[0]*x0 + coeff[1]*x1 + ..., added left to right as Caffe does
    (float32 addition is not associative, so parity depends on the order); no broadcasting.

    Without `coeffs` every coefficient is 1 and no multiplication happens, as in Caffe.
    """

    def __init__(self, coeffs: Sequence[float] | None = None) -> None:
        super().__init__()
        self.coeffs = None if coeffs is None else tuple(float(c) for c in coeffs)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        shapes = [tuple(t.shape) for t in inputs]
        if len(set(shapes)) != 1:
            raise ValueError(f"Eltwise SUM needs inputs of one shape, got {shapes}")
        if self.coeffs is not None and len(self.coeffs) != len(inputs):
            raise ValueError(f"Eltwise SUM has {len(self.coeffs)} coefficients for {len(inputs)} inputs")
        coeffs = self.coeffs or (1.0,) * len(inputs)
        out = inputs[0] if coeffs[0] == 1 else inputs[0] * coeffs[0]
        for coeff, other in zip(coeffs[1:], inputs[1:]):
            out = out + other if coeff == 1 else out + other * coeff
        return out

    def extra_repr(self) -> str:
        return "" if self.coeffs is None else f"coeffs={self.coeffs}"
