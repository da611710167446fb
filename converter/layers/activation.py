"""Converters for elementwise layers: ReLU, PReLU, ELU, Sigmoid, TanH, AbsVal, Power, Exp, Log,
BNLL, Threshold, Dropout (identity at test time)."""

from __future__ import annotations

from typing import Any

from torch import nn

from converter.layers.registry import LayerSpec, register
from models.caffe_ops import (
    AbsVal,
    CaffeBNLL,
    CaffeELU,
    CaffeExp,
    CaffeLog,
    CaffePower,
    CaffePReLU,
    CaffeReLU,
    CaffeThreshold,
    Dropout,
    Identity,
    Sigmoid,
    TanH,
)


def _unary(spec: LayerSpec) -> None:
    spec.bottoms(1)
    spec.tops(1)


@register("ReLU")
def relu(spec: LayerSpec) -> nn.Module:
    """ReLU with Caffe's negative_slope (leaky when non-zero)."""
    _unary(spec)
    return CaffeReLU(spec.param.relu_param.negative_slope)


@register("PReLU")
def prelu(spec: LayerSpec) -> nn.Module:
    """PReLU: one slope per channel (axis 1), or one for all with channel_shared."""
    _unary(spec)
    shape = spec.shapes[0]
    spec.check(len(shape) >= 2, f"needs a bottom with a channel axis, got shape {shape}")
    channels = 1 if spec.param.prelu_param.channel_shared else shape[1]
    return spec.load(CaffePReLU(channels))


@register("ELU")
def elu(spec: LayerSpec) -> nn.Module:
    """ELU with Caffe's alpha."""
    _unary(spec)
    return CaffeELU(spec.param.elu_param.alpha)


@register("Sigmoid")
def sigmoid(spec: LayerSpec) -> nn.Module:
    """Logistic sigmoid."""
    _unary(spec)
    return Sigmoid()


@register("TanH")
def tanh(spec: LayerSpec) -> nn.Module:
    """Hyperbolic tangent."""
    _unary(spec)
    return TanH()


@register("AbsVal")
def absval(spec: LayerSpec) -> nn.Module:
    """|x|."""
    _unary(spec)
    return AbsVal()


@register("Power")
def power(spec: LayerSpec) -> nn.Module:
    """(shift + scale * x) ^ power."""
    _unary(spec)
    p = spec.param.power_param
    return CaffePower(p.power, p.scale, p.shift)


def _base_scale_shift(spec: LayerSpec, param: Any) -> tuple[float, float, float]:
    """(base, scale, shift) of Exp/Log; base is -1 (e) or positive and not 1."""
    _unary(spec)
    base = param.base
    spec.check(base == -1 or (base > 0 and base != 1), f"base must be -1 (e) or positive and not 1, got {base}")
    return base, param.scale, param.shift


@register("Exp")
def exp(spec: LayerSpec) -> nn.Module:
    """base ^ (shift + scale * x); base -1 is e."""
    return CaffeExp(*_base_scale_shift(spec, spec.param.exp_param))


@register("Log")
def log(spec: LayerSpec) -> nn.Module:
    """log_base(shift + scale * x); base -1 is e."""
    return CaffeLog(*_base_scale_shift(spec, spec.param.log_param))


@register("BNLL")
def bnll(spec: LayerSpec) -> nn.Module:
    """log(1 + exp(x)), Caffe's overflow-safe form."""
    _unary(spec)
    return CaffeBNLL()


@register("Threshold")
def threshold(spec: LayerSpec) -> nn.Module:
    """1 where x > threshold, else 0."""
    _unary(spec)
    return CaffeThreshold(spec.param.threshold_param.threshold)


@register("Dropout")
def dropout(spec: LayerSpec) -> nn.Module:
    """Identity in the TEST phase (Caffe scales kept values by 1/(1-ratio) while training, so inference
    passes values unchanged); in a TRAIN-phase build, nn.Dropout, which does the same in train() mode."""
    _unary(spec)
    ratio = spec.param.dropout_param.dropout_ratio
    spec.check(0 <= ratio < 1, f"dropout_ratio must be in [0, 1), got {ratio}")
    return Identity() if spec.phase == "TEST" else Dropout(ratio)

