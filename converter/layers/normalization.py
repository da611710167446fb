"""Converters for normalising and affine layers: BatchNorm, Scale, Bias, Normalize, MVN."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from converter.caffe.params import bn_eps, bn_statistics
from converter.layers.registry import LayerSpec, Shape, register
from models.caffe_ops import CaffeBatchNorm, CaffeBias, CaffeMVN, CaffeNormalize, CaffeScale


def _channels(spec: LayerSpec) -> int:
    shape = spec.shapes[0]
    spec.check(len(shape) >= 2, f"needs a bottom with a channel axis, got shape {shape}")
    return shape[1]


@register("BatchNorm")
def batch_norm(spec: LayerSpec) -> nn.Module:
    """BatchNorm: statistics divided by the moving-average factor (0 means 0), eps from the layer;
    use_global_stats defaults to true in the TEST phase and false in TRAIN, as in Caffe."""
    spec.bottoms(1)
    spec.tops(1)
    channels = _channels(spec)
    p = spec.param.batch_norm_param
    use_global = p.use_global_stats if p.HasField("use_global_stats") else spec.phase == "TEST"
    eps = bn_eps(spec.layer, spec.path)
    module = CaffeBatchNorm(channels, eps, use_global_stats=use_global)
    spec.blob_count(3)
    if spec.layer.blobs:
        mean, var = spec.blob(0, (channels,)), spec.blob(1, (channels,))
        factor = spec.blob(2, (1,))
        mean, var = bn_statistics(
            mean.numpy(), var.numpy(), float(factor[0]), path=spec.path, layer=spec.layer.name
        )
        with torch.no_grad():
            module.running_mean.copy_(torch.as_tensor(mean))
            module.running_var.copy_(torch.as_tensor(var))
    return module


def _span(spec: LayerSpec, axis: int, num_axes: int) -> tuple[int, Shape]:
    """(axis, parameter shape) for Scale/Bias with one bottom: bottom dims [axis, axis + num_axes)."""
    shape = spec.shapes[0]
    axis = axis + len(shape) if axis < 0 else axis
    spec.check(0 <= axis <= len(shape), f"axis out of range for bottom shape {shape}")
    spec.check(num_axes >= -1, f"num_axes must be -1 or more, got {num_axes}")
    end = len(shape) if num_axes == -1 else axis + num_axes
    spec.check(end <= len(shape), f"axis {axis} + num_axes {num_axes} exceeds bottom shape {shape}")
    return axis, tuple(shape[axis:end])


def _second_bottom_span(spec: LayerSpec, axis: int) -> tuple[int, Shape]:
    """(axis, shape) when the parameter is the second bottom, which must match bottom 0 from `axis`."""
    shape, other = spec.shapes
    axis = axis + len(shape) if axis < 0 else axis
    spec.check(
        tuple(shape[axis : axis + len(other)]) == tuple(other),
        f"second bottom {other} does not match bottom {shape} from axis {axis}",
    )
    return axis, tuple(other)


def _affine_span(spec: LayerSpec, param: Any) -> tuple[int, Shape]:
    """(axis, parameter shape) of a Scale/Bias: from the second bottom, or axis..axis+num_axes."""
    spec.bottoms(1, 2)
    spec.tops(1)
    if len(spec.shapes) == 2:
        return _second_bottom_span(spec, param.axis)
    return _span(spec, param.axis, param.num_axes)


@register("Scale")
def scale(spec: LayerSpec) -> nn.Module:
    """Scale: x * gamma (+ beta); gamma spans axis..axis+num_axes, or is the second bottom."""
    p = spec.param.scale_param
    axis, shape = _affine_span(spec, p)
    return spec.load(CaffeScale(axis, shape, learned_scale=len(spec.shapes) == 1, bias_term=p.bias_term))


@register("Bias")
def bias(spec: LayerSpec) -> nn.Module:
    """Bias: x + beta; beta spans axis..axis+num_axes, or is the second bottom."""
    axis, shape = _affine_span(spec, spec.param.bias_param)
    return spec.load(CaffeBias(axis, shape, learned=len(spec.shapes) == 1))


@register("Normalize")
def normalize(spec: LayerSpec) -> nn.Module:
    """SSD's Normalize (L2 over C,H,W or over C per pixel, then a learned scale)."""
    spec.bottoms(1)
    spec.tops(1)
    p = spec.param.norm_param
    module = CaffeNormalize(
        _channels(spec), across_spatial=p.across_spatial, channel_shared=p.channel_shared, eps=p.eps
    )
    return spec.load(module)


@register("MVN")
def mvn(spec: LayerSpec) -> nn.Module:
    """Mean-variance normalisation over H,W (or C,H,W)."""
    spec.bottoms(1)
    spec.tops(1)
    shape = spec.shapes[0]
    spec.check(len(shape) >= 2 and math.prod(shape[2:]) > 0, f"needs an N,C,... bottom, got {shape}")
    p = spec.param.mvn_param
    return CaffeMVN(normalize_variance=p.normalize_variance, across_channels=p.across_channels, eps=p.eps)
