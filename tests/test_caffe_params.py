"""Layer parameters read with Caffe's defaults: BatchNorm eps and factor, geometry forms, Interp."""

from __future__ import annotations

import numpy as np
import pytest

from converter.caffe.params import DEFAULT_BN_EPS, INTERP_DEFAULTS, axis_pair, bn_eps, bn_statistics, interp_params
from converter.caffe.prototxt import parse_prototxt_text
from converter.errors import CaffeError


def _layer(text: str):
    return parse_prototxt_text(f"layer {{ name: 'l' type: 'X' {text} }}").layer[0]


def test_bn_eps_defaults_to_caffes_and_keeps_the_float32_field_short() -> None:
    assert bn_eps(_layer("")) == DEFAULT_BN_EPS == 1e-5
    assert bn_eps(_layer("batch_norm_param { eps: 0.001 }")) == 0.001  # not 0.0010000000474974513


def test_bn_statistics_divide_by_the_factor_and_a_zero_factor_means_zero() -> None:
    mean, var = np.array([2.0, 4.0], np.float32), np.array([8.0, 6.0], np.float32)
    got_mean, got_var = bn_statistics(mean, var, np.array([2.0], np.float32))
    assert got_mean.tolist() == [1.0, 2.0] and got_var.tolist() == [4.0, 3.0] and got_var.dtype == np.float32
    zero_mean, zero_var = bn_statistics(mean, var, np.array([0.0], np.float32))
    assert zero_mean.tolist() == [0.0, 0.0] and zero_var.tolist() == [0.0, 0.0]


def test_conv_geometry_reads_none_one_two_values_or_h_w_fields() -> None:
    conv = lambda text: _layer(f"convolution_param {{ {text} }}").convolution_param  # noqa: E731
    assert axis_pair(conv(""), "stride", 1) == (1, 1)
    assert axis_pair(conv("pad: 2"), "pad", 0) == (2, 2)
    assert axis_pair(conv("kernel_size: 3 kernel_size: 5"), "kernel_size", 0) == (3, 5)
    assert axis_pair(conv("stride: 4 stride_h: 2 stride_w: 3"), "stride", 1) == (2, 3)
    assert axis_pair(conv("kernel_h: 1 kernel_w: 7"), "kernel_size", 0) == (1, 7)
    assert axis_pair(conv("dilation: 2"), "dilation", 1) == (2, 2)
    with pytest.raises(CaffeError, match="pad has 3 values"):
        axis_pair(conv("pad: 1 pad: 1 pad: 1"), "pad", 0)


def test_pool_geometry_reads_scalars_or_h_w_fields() -> None:
    pool = lambda text: _layer(f"pooling_param {{ {text} }}").pooling_param  # noqa: E731
    assert axis_pair(pool("kernel_size: 3 stride: 2"), "kernel_size", 0) == (3, 3)
    assert axis_pair(pool("kernel_size: 3"), "stride", 1) == (1, 1)
    assert axis_pair(pool("pad_h: 1 pad_w: 0"), "pad", 0) == (1, 0)


def test_interp_params_take_caffes_defaults_and_rename_height_width() -> None:
    assert interp_params(_layer("")) == INTERP_DEFAULTS
    got = interp_params(_layer("interp_param { shrink_factor: 2 zoom_factor: 3 height: 5 width: 6 pad_end: -1 }"))
    assert got == {"zoom_factor": 3, "shrink_factor": 2, "pad_beg": 0, "pad_end": -1, "out_height": 5, "out_width": 6}
