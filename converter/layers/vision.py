"""Converters for spatial layers: Convolution, Deconvolution, Pooling, LRN, Interp, Crop."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from converter.caffe.params import axis_pair, interp_params
from converter.errors import CaffeError
from converter.layers.registry import LayerSpec, register
from models.caffe_ops import CaffeConv2d, CaffeDeconv2d, CaffeLRN, CaffePool2d, Crop, PerBottom
from models.interp import CaffeInterp


def _image_bottoms(spec: LayerSpec) -> tuple[int, int, int]:
    """(channels, height, width) shared by every bottom, which must be N,C,H,W."""
    for shape in spec.shapes:
        spec.check(len(shape) == 4, f"needs N,C,H,W bottoms, got shape {shape}")
    spec.check(len(set(spec.shapes)) == 1, f"bottoms must share one shape, got {list(spec.shapes)}")
    return spec.shapes[0][1], spec.shapes[0][2], spec.shapes[0][3]


@dataclass(frozen=True)
class Geometry:
    """(h, w) pairs of a convolution or pooling window."""

    kernel: tuple[int, int]
    stride: tuple[int, int]
    pad: tuple[int, int]
    dilation: tuple[int, int] = (1, 1)


def _geometry(spec: LayerSpec, param: Any, *, dilation: bool) -> Geometry:
    """Kernel, stride, pad (and dilation) read as Caffe does (scalar, list or _h/_w), validated."""
    try:
        g = Geometry(
            kernel=axis_pair(param, "kernel_size", 0),
            stride=axis_pair(param, "stride", 1),
            pad=axis_pair(param, "pad", 0),
            dilation=axis_pair(param, "dilation", 1) if dilation else (1, 1),
        )
    except CaffeError as exc:
        raise spec.error(exc.message) from None
    spec.check(min(g.kernel) > 0, f"kernel size must be positive, got {g.kernel}")
    spec.check(min(g.stride) > 0, f"stride must be positive, got {g.stride}")
    spec.check(min(g.dilation) > 0, f"dilation must be positive, got {g.dilation}")
    return g


def _per_bottom(spec: LayerSpec, module: nn.Module) -> nn.Module:
    """Convolutions may pair several bottoms with as many tops, all through the same weights."""
    spec.check(len(spec.shapes) == len(spec.layer.tops), "needs as many tops as bottoms")
    return module if len(spec.shapes) == 1 else PerBottom(module)


def _convolution(spec: LayerSpec, module_class: type[nn.Module]) -> nn.Module:
    """A (de)convolution module of `module_class` from the layer's validated parameters, weights loaded."""
    spec.check(len(spec.shapes) >= 1, "needs a bottom")
    channels, _, _ = _image_bottoms(spec)
    p = spec.param.convolution_param
    spec.check(p.axis in (1, -3), f"only axis 1 (channels) is supported, got axis {p.axis}")
    g = _geometry(spec, p, dilation=True)
    spec.check(p.num_output > 0, f"num_output must be positive, got {p.num_output}")
    spec.check(p.group > 0, f"group must be positive, got {p.group}")
    spec.check(channels % p.group == 0, f"group {p.group} does not divide the {channels} input channels")
    spec.check(p.num_output % p.group == 0, f"group {p.group} does not divide num_output {p.num_output}")
    module = spec.new(
        module_class, channels, p.num_output, g.kernel, stride=g.stride, padding=g.pad, dilation=g.dilation,
        groups=p.group, bias=p.bias_term,
    )
    return _per_bottom(spec, spec.load(module))


@register("Convolution")
def convolution(spec: LayerSpec) -> nn.Module:
    """Convolution with groups, dilation, optional bias; kernel/stride/pad as scalar, list or _h/_w."""
    return _convolution(spec, CaffeConv2d)


@register("Deconvolution")
def deconvolution(spec: LayerSpec) -> nn.Module:
    """Deconvolution (Caffe's weight is in x out/group x kh x kw, as ConvTranspose2d's)."""
    return _convolution(spec, CaffeDeconv2d)


@register("Pooling")
def pooling(spec: LayerSpec) -> nn.Module:
    """MAX / AVE pooling with Caffe's rounding and AVE divisor; global_pooling; STOCHASTIC refused."""
    spec.bottoms(1)
    spec.tops(1, 2)
    spec.check(len(spec.layer.tops) == 1, "a second top (MAX pooling's argmax mask) is not supported")
    _, height, width = _image_bottoms(spec)
    p = spec.param.pooling_param
    method = type(p).PoolMethod.Name(p.pool)
    spec.check(method != "STOCHASTIC", "STOCHASTIC pooling is random at training and not supported")
    if p.global_pooling:
        spec.check(not (p.HasField("kernel_size") or p.HasField("kernel_h")), "global_pooling takes no kernel size")
        g = Geometry(kernel=(height, width), stride=(1, 1), pad=(0, 0))
    else:
        g = _geometry(spec, p, dilation=False)
    spec.check(all(pad < k for pad, k in zip(g.pad, g.kernel)), f"pad {g.pad} must be smaller than the kernel {g.kernel}")
    ceil = type(p).RoundMode.Name(p.round_mode) == "CEIL"
    pool = CaffePool2d(method, g.kernel, g.stride, g.pad, ceil=ceil)
    out_h, out_w = pool.output_size(height, width)
    spec.check(out_h > 0 and out_w > 0, f"pooling a {height}x{width} input gives an empty {out_h}x{out_w} output")
    return pool


@register("LRN")
def lrn(spec: LayerSpec) -> nn.Module:
    """Local response normalisation across or within channels (odd local_size, as Caffe requires)."""
    spec.bottoms(1)
    _image_bottoms(spec)
    p = spec.param.lrn_param
    spec.check(p.local_size % 2 == 1, f"local_size must be odd, got {p.local_size}")
    across = type(p).NormRegion.Name(p.norm_region) == "ACROSS_CHANNELS"
    return CaffeLRN(p.local_size, p.alpha, p.beta, p.k, across_channels=across)


@register("Interp")
def interp(spec: LayerSpec) -> nn.Module:
    """The DeepLab fork's Interp (bilinear, aligned corners; zoom/shrink/height/width/pads)."""
    spec.bottoms(1)
    _, height, width = _image_bottoms(spec)
    try:
        p = interp_params(spec.layer)
        module = CaffeInterp(
            zoom_factor=p["zoom_factor"], shrink_factor=p["shrink_factor"], pad_beg=p["pad_beg"],
            pad_end=p["pad_end"], height=p["out_height"], width=p["out_width"],
        )
        module.output_size(height, width)
    except ValueError as exc:
        raise spec.error(str(exc)) from None
    return module


@register("Crop")
def crop(spec: LayerSpec) -> nn.Module:
    """Crop the first bottom to the second's shape from `axis` on, at one offset for all or one per axis."""
    spec.bottoms(2)
    source, like = spec.shapes
    p = spec.param.crop_param
    spec.check(len(source) == len(like), f"bottoms have different ranks: {source} and {like}")
    axis = p.axis + len(source) if p.axis < 0 else p.axis
    spec.check(0 <= axis < len(source), f"axis {p.axis} out of range for shape {source}")
    count = len(source) - axis
    offsets = list(p.offset)
    spec.check(len(offsets) in (0, 1, count), f"{len(offsets)} offsets for {count} cropped axes")
    offsets = offsets * count if len(offsets) == 1 else offsets or [0] * count
    for i, offset in enumerate(offsets):
        dim = axis + i
        spec.check(offset + like[dim] <= source[dim], f"crop of axis {dim} at {offset} + {like[dim]} exceeds {source[dim]}")
    return Crop(axis, offsets)
