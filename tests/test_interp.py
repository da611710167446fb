"""Caffe Interp (DeepLab fork): real-Caffe reference, edge cases, pads, bad parameters."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.interp import CaffeInterp, caffe_interp, caffe_interp_size


def test_interp_matches_real_caffe_reference(shared_reference):
    """OpenCV's Caffe test case: Interp to height 9/width 8, then zoom 2, outputs made by real Caffe."""
    folder = shared_reference / "caffe_layers_opencv"
    x = torch.from_numpy(np.load(folder / "layer_interp.input.npy"))
    expected = np.load(folder / "layer_interp.npy")
    first = CaffeInterp(height=9, width=8)(x)
    out = CaffeInterp(zoom_factor=2)(first).numpy()
    assert out.shape == expected.shape == (2, 3, 17, 15)
    assert np.abs(out - expected).mean() <= 1e-5
    assert np.abs(out - expected).max() <= 1e-4


def test_interp_to_size_one_samples_the_first_pixel():
    x = torch.arange(12, dtype=torch.float32).reshape(1, 1, 3, 4)
    out = caffe_interp(x, 1, 1)
    assert torch.equal(out, torch.zeros(1, 1, 1, 1))
    assert caffe_interp_size(3, 4, shrink_factor=8) == (1, 1)


def test_interp_from_size_one_copies_the_pixel():
    x = torch.full((2, 3, 1, 1), 2.5)
    assert caffe_interp_size(1, 1, zoom_factor=8) == (1, 1)
    out = caffe_interp(x, 5, 7)
    assert torch.isfinite(out).all()
    assert torch.equal(out, torch.full((2, 3, 5, 7), 2.5))


def test_interp_negative_pads_crop_both_axes_before_resizing():
    x = torch.randn(1, 2, 9, 11)
    size = caffe_interp_size(9, 11, zoom_factor=2, pad_beg=-1, pad_end=-2)
    assert size == (11, 15)  # H' = 6 -> 6 + 5, W' = 8 -> 8 + 7
    out = CaffeInterp(zoom_factor=2, pad_beg=-1, pad_end=-2)(x)
    assert torch.equal(out, caffe_interp(x[:, :, 1:7, 1:9], 11, 15))


def test_interp_positive_pads_add_zeros():
    x = torch.ones(1, 1, 2, 2)
    out = caffe_interp(x, 4, 4, pad_beg=1, pad_end=1)
    expected = torch.zeros(1, 1, 4, 4)
    expected[..., 1:3, 1:3] = 1
    assert torch.equal(out, expected)


def test_interp_same_size_is_a_copy():
    x = torch.randn(2, 3, 5, 6)
    assert torch.equal(CaffeInterp(height=5, width=6)(x), x)


@pytest.mark.parametrize(
    "params",
    [
        {"zoom_factor": 0},
        {"shrink_factor": 0},
        {"height": 5},
        {"width": 5},
        {"height": -2, "width": 3},
    ],
)
def test_interp_rejects_bad_parameters_when_built(params):
    with pytest.raises(ValueError):
        CaffeInterp(**params)


def test_interp_rejects_pads_that_leave_nothing():
    with pytest.raises(ValueError, match="leaves"):
        caffe_interp_size(3, 3, pad_beg=-2, pad_end=-1, zoom_factor=2)
    with pytest.raises(ValueError):
        CaffeInterp(shrink_factor=2, pad_beg=-1)(torch.zeros(1, 1, 1, 5))


def test_interp_module_follows_the_input_size():
    layer = CaffeInterp(shrink_factor=4, zoom_factor=3)
    assert layer(torch.zeros(2, 3, 513, 321)).shape == (2, 3, 385, 241)
    assert "shrink_factor=4" in repr(layer) and "zoom_factor=3" in repr(layer)
