"""PyTorch modules with Caffe's layer semantics, for the layer registry (converter/layers).

Each module computes what its Caffe layer's CPU forward computes, in the same order of
operations where that matters for float32 parity, and keeps Caffe's parameters visible
(`extra_repr`). Modules that hold Caffe blobs name them in Caffe's blob order in
`caffe_blobs`, each stored in the blob's Caffe shape. Imports torch only.

Where Caffe differs from PyTorch's default, the difference is in the code and named:
pooling's output size (ceil with the last-window clip, `models.caffe_layers`), the padded
AVE divisor, LRN WITHIN_CHANNEL ignoring `k`, MVN adding eps after the square root,
ArgMax's tie order, Exp/Log's base/scale/shift, BNLL's split formula.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models.caffe_layers import SameShape, caffe_batch_norm, caffe_pool_output_size, conv_output_size


Shape = tuple[int, ...]


def channel_shape(x: torch.Tensor, axis: int, shape: Sequence[int]) -> tuple[int, ...]:
    """The shape that broadcasts a parameter of `shape` against `x` starting at `axis`."""
    return (1,) * axis + tuple(shape) + (1,) * (x.dim() - axis - len(shape))


class CaffeBatchNorm(SameShape, nn.Module):
    """Caffe BatchNorm: global statistics (already divided by the moving-average factor) or,
    with use_global_stats false, the batch's own mean and biased variance over all axes but 1."""

    caffe_blobs = ("running_mean", "running_var", "factor")

    def __init__(self, channels: int, eps: float, use_global_stats: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.use_global_stats = use_global_stats
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))
        # Caffe's third blob; 1 because running_mean/var are stored already divided by it.
        self.register_buffer("factor", torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_global_stats:
            return caffe_batch_norm(x, self.running_mean, self.running_var, self.eps)
        dims = [d for d in range(x.dim()) if d != 1]
        mean = x.mean(dim=dims)
        centered = x - mean.reshape(channel_shape(x, 1, mean.shape))
        var = (centered * centered).mean(dim=dims)
        return centered / torch.sqrt(var + self.eps).reshape(channel_shape(x, 1, var.shape))

    def extra_repr(self) -> str:
        return f"{self.running_mean.numel()}, eps={self.eps}, use_global_stats={self.use_global_stats}"


class CaffeScale(SameShape, nn.Module):
    """Caffe Scale: x * scale (+ bias), the scale spanning `shape` from `axis`; with a second
    bottom the scale is that bottom (no weight blob) and the bias is blob 0."""

    def __init__(self, axis: int, shape: Sequence[int], *, learned_scale: bool, bias_term: bool) -> None:
        super().__init__()
        self.axis = axis
        self.shape = tuple(shape)
        blobs = []
        if learned_scale:
            self.weight = nn.Parameter(torch.ones(self.shape))
            blobs.append("weight")
        if bias_term:
            self.bias = nn.Parameter(torch.zeros(self.shape))
            blobs.append("bias")
        self.caffe_blobs = tuple(blobs)

    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        shape = channel_shape(x, self.axis, self.shape)
        out = x * (self.weight if scale is None else scale).reshape(shape)
        if "bias" in self.caffe_blobs:
            out = out + self.bias.reshape(shape)
        return out

    def extra_repr(self) -> str:
        return f"axis={self.axis}, shape={self.shape}, blobs={self.caffe_blobs}"


class CaffeBias(SameShape, nn.Module):
    """Caffe Bias: x + bias spanning `shape` from `axis`; the bias is blob 0 or the second bottom."""

    def __init__(self, axis: int, shape: Sequence[int], *, learned: bool) -> None:
        super().__init__()
        self.axis = axis
        self.shape = tuple(shape)
        self.caffe_blobs: tuple[str, ...] = ("bias",) if learned else ()
        if learned:
            self.bias = nn.Parameter(torch.zeros(self.shape))

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return x + (self.bias if bias is None else bias).reshape(channel_shape(x, self.axis, self.shape))


class CaffeInnerProduct(nn.Module):
    """Caffe InnerProduct: flattens from `axis`, weight N x K (or K x N with transpose), bias N."""

    def __init__(
        self, in_features: int, out_features: int, *, axis: int, bias: bool, transpose: bool, device: Any = None
    ) -> None:
        super().__init__()
        self.axis = axis
        self.transpose = transpose
        shape = (in_features, out_features) if transpose else (out_features, in_features)
        self.weight = nn.Parameter(torch.empty(shape, device=device))
        self.caffe_blobs: tuple[str, ...] = ("weight", "bias") if bias else ("weight",)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's initialisation (for nets built without weights)."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def output_shapes(self, shape: Shape) -> tuple[Shape, ...]:
        return ((*shape[: self.axis], self.weight.shape[1 if self.transpose else 0]),)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(*x.shape[: self.axis], -1)
        return F.linear(flat, self.weight.t() if self.transpose else self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"weight={tuple(self.weight.shape)}, axis={self.axis}, transpose={self.transpose}"


class CaffeConv2d(nn.Conv2d):
    """nn.Conv2d (Caffe's convolution is PyTorch's) with its Caffe blobs named and its output shape."""

    def __init__(self, *args: Any, device: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, device=device, **kwargs)
        self.caffe_blobs = ("weight", "bias") if self.bias is not None else ("weight",)

    def output_shapes(self, shape: Shape) -> tuple[Shape, ...]:
        size = [
            conv_output_size(n, k, s, p, d)
            for n, k, s, p, d in zip(shape[-2:], self.kernel_size, self.stride, self.padding, self.dilation)
        ]
        return ((shape[0], self.out_channels, *size),)


class CaffeDeconv2d(nn.ConvTranspose2d):
    """nn.ConvTranspose2d as Caffe's Deconvolution (weight in x out/group x kh x kw): size
    stride * (n - 1) + dilation * (k - 1) + 1 - 2 * pad."""

    def __init__(self, *args: Any, device: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, device=device, **kwargs)
        self.caffe_blobs = ("weight", "bias") if self.bias is not None else ("weight",)

    def output_shapes(self, shape: Shape) -> tuple[Shape, ...]:
        size = [
            s * (n - 1) + d * (k - 1) + 1 - 2 * p
            for n, k, s, p, d in zip(shape[-2:], self.kernel_size, self.stride, self.padding, self.dilation)
        ]
        return ((shape[0], self.out_channels, *size),)


class Sigmoid(SameShape, nn.Sigmoid):
    """Caffe Sigmoid."""


class TanH(SameShape, nn.Tanh):
    """Caffe TanH."""


class CaffePool2d(nn.Module):
    """Caffe MAX / AVE pooling: output size by Caffe's rule (ceil with the last-window clip, or
    floor), AVE divided by the window clipped to the padded image (padding counts, the
    overhang past the padding does not). Native PyTorch pooling where it computes the same
    (pad at most half the kernel and the same output size); else explicit padding."""

    def __init__(
        self, method: str, kernel: tuple[int, int], stride: tuple[int, int], pad: tuple[int, int], ceil: bool = True
    ) -> None:
        super().__init__()
        if method not in ("MAX", "AVE"):
            raise ValueError(f"pooling method must be MAX or AVE, got {method}")
        self.method = method
        self.kernel, self.stride, self.pad, self.ceil = tuple(kernel), tuple(stride), tuple(pad), ceil

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """Caffe's pooled (height, width) for an input of `height` x `width`."""
        sizes = []
        for size, k, s, p in zip((height, width), self.kernel, self.stride, self.pad):
            if self.ceil:
                sizes.append(caffe_pool_output_size(size, k, s, p))
            else:
                sizes.append((size + 2 * p - k) // s + 1)
        return sizes[0], sizes[1]

    def output_shapes(self, shape: Shape) -> tuple[Shape, ...]:
        return ((*shape[:-2], *self.output_size(shape[-2], shape[-1])),)

    def _native_size(self, size: int, axis: int) -> int:
        k, s, p = self.kernel[axis], self.stride[axis], self.pad[axis]
        if not self.ceil:
            return (size + 2 * p - k) // s + 1
        out = -(-(size + 2 * p - k) // s) + 1
        return out - 1 if (out - 1) * s >= size + p else out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        out_h, out_w = self.output_size(height, width)
        native = all(2 * p <= k for p, k in zip(self.pad, self.kernel)) and (
            self._native_size(height, 0),
            self._native_size(width, 1),
        ) == (out_h, out_w)
        if native and self.method == "MAX":
            return F.max_pool2d(x, self.kernel, self.stride, self.pad, ceil_mode=self.ceil)
        if native:
            return F.avg_pool2d(x, self.kernel, self.stride, self.pad, ceil_mode=self.ceil, count_include_pad=True)
        return self._padded(x, out_h, out_w)

    def _padded(self, x: torch.Tensor, out_h: int, out_w: int) -> torch.Tensor:
        """Pad explicitly to cover every window, pool without padding, crop to Caffe's size."""
        (kh, kw), (sh, sw), (ph, pw) = self.kernel, self.stride, self.pad
        height, width = x.shape[-2:]
        extra_h = max(0, (out_h - 1) * sh + kh - height - ph)
        extra_w = max(0, (out_w - 1) * sw + kw - width - pw)
        # An empty MAX window (a ceil window starting past an unpadded image) is Caffe's initial -FLT_MAX.
        fill = torch.finfo(x.dtype).min if self.method == "MAX" else 0.0
        padded = F.pad(x, (pw, extra_w, ph, extra_h), value=fill)
        if self.method == "MAX":
            return F.max_pool2d(padded, self.kernel, self.stride)[..., :out_h, :out_w]
        sums = F.avg_pool2d(padded, self.kernel, self.stride, divisor_override=1)[..., :out_h, :out_w]
        return sums / self._divisor(height, width, out_h, out_w, x)

    def _divisor(self, height: int, width: int, out_h: int, out_w: int, x: torch.Tensor) -> torch.Tensor:
        """Caffe's AVE pool_size per output cell: (min(start + k, size + pad) - start) per axis."""
        counts = []
        for size, out, k, s, p in zip((height, width), (out_h, out_w), self.kernel, self.stride, self.pad):
            start = torch.arange(out, device=x.device) * s - p
            counts.append(torch.clamp(start + k, max=size + p) - start)
        return (counts[0][:, None] * counts[1][None, :]).to(x.dtype)

    def extra_repr(self) -> str:
        rounding = "ceil" if self.ceil else "floor"
        return f"{self.method}, kernel={self.kernel}, stride={self.stride}, pad={self.pad}, {rounding}"


class CaffeLRN(SameShape, nn.Module):
    """Caffe LRN. ACROSS_CHANNELS: x * (k + alpha/n * sum of x^2 over n channels)^-beta.
    WITHIN_CHANNEL: x * (1 + alpha * mean of x^2 over an n x n window, zero padded)^-beta
    (Caffe builds it from Pooling and Power layers with shift 1: `k` is not used)."""

    def __init__(self, size: int, alpha: float, beta: float, k: float, across_channels: bool) -> None:
        super().__init__()
        self.size, self.alpha, self.beta, self.k = size, alpha, beta, k
        self.across_channels = across_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.across_channels:
            return F.local_response_norm(x, self.size, alpha=self.alpha, beta=self.beta, k=self.k)
        pad = (self.size - 1) // 2
        mean = F.avg_pool2d(x * x, self.size, stride=1, padding=pad, count_include_pad=True)
        return x * torch.pow(1 + self.alpha * mean, -self.beta)

    def extra_repr(self) -> str:
        region = "ACROSS_CHANNELS" if self.across_channels else "WITHIN_CHANNEL"
        return f"{region}, size={self.size}, alpha={self.alpha}, beta={self.beta}, k={self.k}"


class CaffeReLU(SameShape, nn.Module):
    """Caffe ReLU: max(x, 0) + negative_slope * min(x, 0)."""

    def __init__(self, negative_slope: float = 0.0) -> None:
        super().__init__()
        self.negative_slope = negative_slope

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x) if self.negative_slope == 0 else F.leaky_relu(x, self.negative_slope)


class CaffePReLU(SameShape, nn.Module):
    """Caffe PReLU: max(x, 0) + a * min(x, 0) with a per channel (axis 1) or one shared a."""

    caffe_blobs = ("weight",)

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((channels,), 0.25))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.prelu(x, self.weight)


class CaffeELU(SameShape, nn.Module):
    """Caffe ELU: x if x > 0 else alpha * (exp(x) - 1), with exp - 1 as Caffe writes it (not expm1)."""

    def __init__(self, alpha: float) -> None:
        super().__init__()
        self.alpha = alpha

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where(x > 0, x, self.alpha * (torch.exp(x) - 1))


class CaffeBNLL(SameShape, nn.Module):
    """Caffe BNLL: log(1 + exp(x)) written as max(x, 0) + log(1 + exp(-|x|)), which cannot overflow."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(x, min=0) + torch.log(1 + torch.exp(-x.abs()))


class CaffePower(SameShape, nn.Module):
    """Caffe Power: (shift + scale * x) ^ power."""

    def __init__(self, power: float, scale: float, shift: float) -> None:
        super().__init__()
        self.power, self.scale, self.shift = power, scale, shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = x * self.scale + self.shift if (self.scale, self.shift) != (1.0, 0.0) else x
        return base if self.power == 1.0 else torch.pow(base, self.power)

    def extra_repr(self) -> str:
        return f"power={self.power}, scale={self.scale}, shift={self.shift}"


class CaffeExp(SameShape, nn.Module):
    """Caffe Exp: base ^ (shift + scale * x) computed as Caffe does, base^shift * exp(ln(base) * scale * x)
    (base -1 means e)."""

    def __init__(self, base: float, scale: float, shift: float) -> None:
        super().__init__()
        log_base = 1.0 if base == -1 else math.log(base)
        self.inner_scale = log_base * scale
        self.outer_scale = math.exp(shift) if base == -1 else base**shift
        self.base, self.scale, self.shift = base, scale, shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inner = x if self.inner_scale == 1 else x * self.inner_scale
        out = torch.exp(inner)
        return out if self.outer_scale == 1 else out * self.outer_scale

    def extra_repr(self) -> str:
        return f"base={self.base}, scale={self.scale}, shift={self.shift}"


class CaffeLog(SameShape, nn.Module):
    """Caffe Log: log_base(shift + scale * x) computed as ln(shift + scale * x) / ln(base) (base -1 means e)."""

    def __init__(self, base: float, scale: float, shift: float) -> None:
        super().__init__()
        self.base_scale = 1.0 if base == -1 else 1.0 / math.log(base)
        self.base, self.scale, self.shift = base, scale, shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inner = x if (self.scale, self.shift) == (1.0, 0.0) else x * self.scale + self.shift
        out = torch.log(inner)
        return out if self.base_scale == 1 else out * self.base_scale

    def extra_repr(self) -> str:
        return f"base={self.base}, scale={self.scale}, shift={self.shift}"


class AbsVal(SameShape, nn.Module):
    """Caffe AbsVal: |x|."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.abs()


class CaffeThreshold(SameShape, nn.Module):
    """Caffe Threshold: 1 where x > threshold, else 0."""

    def __init__(self, threshold: float) -> None:
        super().__init__()
        self.threshold = threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x > self.threshold).to(x.dtype)


class CaffeNormalize(SameShape, nn.Module):
    """SSD's Normalize: x / sqrt(sum x^2 + eps) over C,H,W (across_spatial) or over C per pixel,
    times a scale per channel or one shared scale."""

    caffe_blobs = ("weight",)

    def __init__(self, channels: int, *, across_spatial: bool, channel_shared: bool, eps: float) -> None:
        super().__init__()
        self.across_spatial, self.eps = across_spatial, eps
        self.weight = nn.Parameter(torch.ones(1 if channel_shared else channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = tuple(range(1, x.dim())) if self.across_spatial else (1,)
        norm = torch.sqrt((x * x).sum(dim=dims, keepdim=True) + self.eps)
        return x / norm * self.weight.reshape(channel_shape(x, 1, self.weight.shape))


class CaffeMVN(SameShape, nn.Module):
    """Caffe MVN: subtract the mean over H,W (or C,H,W); with normalize_variance divide by
    sqrt(mean of the squared deviations) + eps (eps added after the root, as Caffe does)."""

    def __init__(self, *, normalize_variance: bool, across_channels: bool, eps: float) -> None:
        super().__init__()
        self.normalize_variance, self.across_channels, self.eps = normalize_variance, across_channels, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = tuple(range(1 if self.across_channels else 2, x.dim()))
        centered = x - x.mean(dim=dims, keepdim=True)
        if not self.normalize_variance:
            return centered
        return centered / (torch.sqrt((centered * centered).mean(dim=dims, keepdim=True)) + self.eps)


class EltwiseProd(SameShape, nn.Module):
    """Caffe Eltwise PROD: the product of inputs of one shape, left to right."""

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        out = inputs[0]
        for other in inputs[1:]:
            out = out * other
        return out


class Concat(nn.Module):
    """Caffe Concat along `axis`."""

    def __init__(self, axis: int) -> None:
        super().__init__()
        self.axis = axis

    def output_shapes(self, *shapes: Shape) -> tuple[Shape, ...]:
        first = list(shapes[0])
        first[self.axis] = sum(shape[self.axis] for shape in shapes)
        return (tuple(first),)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return torch.cat(inputs, dim=self.axis)


class Slice(nn.Module):
    """Caffe Slice: consecutive pieces of `sizes` along `axis`, one per top."""

    def __init__(self, axis: int, sizes: Sequence[int]) -> None:
        super().__init__()
        self.axis, self.sizes = axis, tuple(sizes)

    def output_shapes(self, shape: Shape) -> tuple[Shape, ...]:
        return tuple((*shape[: self.axis], size, *shape[self.axis + 1 :]) for size in self.sizes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(torch.split(x, list(self.sizes), dim=self.axis))


class Split(nn.Module):
    """Caffe Split: the bottom, once per top."""

    def __init__(self, tops: int) -> None:
        super().__init__()
        self.tops = tops

    def output_shapes(self, shape: Shape) -> tuple[Shape, ...]:
        return (tuple(shape),) * self.tops

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (x,) * self.tops


class Reshape(nn.Module):
    """Caffe Reshape / Flatten: the bottom viewed in a shape computed per input from Caffe's rule."""

    def __init__(self, axis: int, num_axes: int, dims: Sequence[int]) -> None:
        super().__init__()
        self.axis, self.num_axes, self.dims = axis, num_axes, tuple(dims)

    def output_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """Replace dims [axis, axis + num_axes) by `dims`: 0 copies the bottom's dim, -1 is inferred."""
        end = len(shape) if self.num_axes == -1 else self.axis + self.num_axes
        middle = [shape[self.axis + i] if d == 0 else d for i, d in enumerate(self.dims)]
        out = [*shape[: self.axis], *middle, *shape[end:]]
        if -1 in out:
            known = math.prod(d for d in out if d != -1)
            out[out.index(-1)] = math.prod(shape) // known if known else 0
        return tuple(int(d) for d in out)

    def output_shapes(self, shape: Shape) -> tuple[Shape, ...]:
        return (self.output_shape(shape),)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(self.output_shape(x.shape))


class Softmax(SameShape, nn.Module):
    """Caffe Softmax along `axis` (exp(x - max) / sum)."""

    def __init__(self, axis: int) -> None:
        super().__init__()
        self.axis = axis

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(x, dim=self.axis)


class ArgMax(nn.Module):
    """Caffe ArgMax. With `axis`: the top_k indices (or values, with out_max_val) along it.
    Without: per sample over C*H*W, shape (N, 1 or 2, top_k, 1): indices, then values.
    Ties go to the larger index (Caffe sorts (value, index) pairs descending)."""

    def __init__(self, top_k: int, out_max_val: bool, axis: int | None) -> None:
        super().__init__()
        self.top_k, self.out_max_val, self.axis = top_k, out_max_val, axis

    def _top(self, x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        size = x.shape[dim]
        flipped = torch.flip(x, dims=(dim,))  # stable descending sort then keeps larger indices first
        values, order = torch.sort(flipped, dim=dim, descending=True, stable=True)
        values = values.narrow(dim, 0, self.top_k)
        indices = (size - 1 - order.narrow(dim, 0, self.top_k)).to(x.dtype)
        return values, indices

    def output_shapes(self, shape: Shape) -> tuple[Shape, ...]:
        if self.axis is not None:
            return ((*shape[: self.axis], self.top_k, *shape[self.axis + 1 :]),)
        return ((shape[0], 2 if self.out_max_val else 1, self.top_k, 1),)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.axis is not None:
            values, indices = self._top(x, self.axis)
            return values if self.out_max_val else indices
        values, indices = self._top(x.reshape(x.shape[0], -1), 1)
        out = torch.stack((indices, values), dim=1) if self.out_max_val else indices[:, None]
        return out[..., None]


class Permute(nn.Module):
    """SSD's Permute: the bottom's axes in `order`."""

    def __init__(self, order: Sequence[int]) -> None:
        super().__init__()
        self.order = tuple(order)

    def output_shapes(self, shape: Shape) -> tuple[Shape, ...]:
        return (tuple(shape[d] for d in self.order),)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(self.order)


class Reduction(nn.Module):
    """Caffe Reduction: SUM, ASUM, SUMSQ or MEAN over every axis from `axis` on, times coeff."""

    def __init__(self, operation: str, axis: int, coeff: float) -> None:
        super().__init__()
        self.operation, self.axis, self.coeff = operation, axis, coeff

    def output_shapes(self, shape: Shape) -> tuple[Shape, ...]:
        return (tuple(shape[: self.axis]),)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(*x.shape[: self.axis], -1)
        if self.operation == "ASUM":
            flat = flat.abs()
        elif self.operation == "SUMSQ":
            flat = flat * flat
        out = flat.mean(dim=-1) if self.operation == "MEAN" else flat.sum(dim=-1)
        return out if self.coeff == 1 else out * self.coeff


class Tile(nn.Module):
    """Caffe Tile: the block from `axis` on repeated `tiles` times along `axis`."""

    def __init__(self, axis: int, tiles: int) -> None:
        super().__init__()
        self.axis, self.tiles = axis, tiles

    def output_shapes(self, shape: Shape) -> tuple[Shape, ...]:
        return ((*shape[: self.axis], shape[self.axis] * self.tiles, *shape[self.axis + 1 :]),)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        repeats = [1] * x.dim()
        repeats[self.axis] = self.tiles
        return x.repeat(repeats)


class Crop(nn.Module):
    """Caffe Crop: the first bottom cut to the second's shape from `axis` on, at `offsets`."""

    def __init__(self, axis: int, offsets: Sequence[int]) -> None:
        super().__init__()
        self.axis, self.offsets = axis, tuple(offsets)

    def output_shapes(self, shape: Shape, like: Shape) -> tuple[Shape, ...]:
        return ((*shape[: self.axis], *like[self.axis :]),)

    def forward(self, x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        for i, offset in enumerate(self.offsets):
            dim = self.axis + i
            x = x.narrow(dim, offset, like.shape[dim])
        return x


class Identity(SameShape, nn.Module):
    """Layers that pass their bottom through at test time (Dropout)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class Dropout(SameShape, nn.Dropout):
    """Caffe Dropout in a TRAIN-phase build: inverted dropout (kept values scaled by 1/(1-p)) in train() mode."""


class PerBottom(nn.Module):
    """A layer with several bottom/top pairs (Convolution allows it): one module, applied to each."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module
        self.caffe_blobs = tuple(f"module.{name}" for name in getattr(module, "caffe_blobs", ()))

    def output_shapes(self, *shapes: Shape) -> tuple[Shape, ...]:
        return tuple(self.module.output_shapes(shape)[0] for shape in shapes)

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.module(x) for x in inputs)
