"""Converters where OpenCV 4.14 lacks the layer or differs from Caffe, against numpy written from
Caffe's own definitions (checked here on 2026-12-02: OpenCV cannot create Bias, Threshold,
Reduction, ArgMax; its Tile needs trivial repeats; its Interp cannot shrink; its MVN puts eps
inside the square root; its Log ignores base/scale/shift; its LRN ignores k; a MAX window that
starts past an unpadded image gives a value where Caffe gives -FLT_MAX)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from converter.caffe.prototxt import parse_prototxt_text
from converter.caffe.load import load_net
from converter.layers import build_net
from tests.registry_nets import RandomNet

SEEDS = (0, 1, 2)


def _run(tmp_path, layers: str, inputs: dict, blobs: dict | None = None, feeds: dict | None = None) -> dict:
    net = RandomNet(layers, inputs, blobs or {})
    prototxt, caffemodel = net.write(tmp_path)
    built = build_net(load_net(caffemodel, prototxt))
    feeds = feeds or net.feeds(np.random.default_rng(0))
    with torch.no_grad():
        out = built.run({k: torch.from_numpy(v) for k, v in feeds.items()}, keep="all")
    return {"feeds": feeds, **{k: v.numpy() for k, v in out.items()}}


def caffe_pool(x: np.ndarray, method: str, k: int, s: int, p: int, out: int) -> np.ndarray:
    """Caffe's pooling_layer.cpp loops along both spatial axes (square geometry), in float64."""
    n, c, h, w = x.shape
    top = np.zeros((n, c, out, out))
    for i in range(out):
        for j in range(out):
            hs, ws = i * s - p, j * s - p
            he, we = min(hs + k, h + p), min(ws + k, w + p)
            size = (he - hs) * (we - ws)
            hs, ws, he, we = max(hs, 0), max(ws, 0), min(he, h), min(we, w)
            window = x[:, :, hs:he, ws:we]
            if method == "MAX":
                top[:, :, i, j] = window.max(axis=(2, 3)) if window.size else -np.finfo(np.float32).max
            else:
                top[:, :, i, j] = window.sum(axis=(2, 3)) / size
    return top


@pytest.mark.parametrize("method", ["MAX", "AVE"])
def test_pool_ceil_rounding_matches_caffe(tmp_path, method: str) -> None:
    """9x9, kernel 3, stride 2, pad 1: ceil gives 5 (floor 4); the last window covers the pad."""
    layers = f'layer {{ name: "p" type: "Pooling" bottom: "data" top: "p" pooling_param {{ pool: {method} kernel_size: 3 stride: 2 pad: 1 }} }}\n'
    out = _run(tmp_path, layers, {"data": (1, 2, 9, 9)})
    np.testing.assert_allclose(out["p"], caffe_pool(out["feeds"]["data"].astype(np.float64), method, 3, 2, 1, 5), atol=1e-6)


def test_pool_clips_a_last_window_that_would_start_in_the_padding(tmp_path) -> None:
    """5x5, kernel 2, stride 2, pad 1: ceil gives 4 windows, Caffe drops the 4th (it starts at 5 >= 5 + 1 - 1)."""
    layers = 'layer { name: "p" type: "Pooling" bottom: "data" top: "p" pooling_param { pool: AVE kernel_size: 2 stride: 2 pad: 1 } }\n'
    out = _run(tmp_path, layers, {"data": (1, 1, 5, 5)})
    assert out["p"].shape == (1, 1, 3, 3)
    np.testing.assert_allclose(out["p"], caffe_pool(out["feeds"]["data"].astype(np.float64), "AVE", 2, 2, 1, 3), atol=1e-6)


@pytest.mark.parametrize("method", ["MAX", "AVE"])
def test_pool_window_starting_past_an_unpadded_image_is_caffes_empty_window(tmp_path, method: str) -> None:
    """5x5, kernel 1, stride 3, no pad: Caffe keeps a 3rd window at 6 (no clip without pad): MAX gives
    -FLT_MAX, AVE divides an empty sum by a negative size."""
    layers = f'layer {{ name: "p" type: "Pooling" bottom: "data" top: "p" pooling_param {{ pool: {method} kernel_size: 1 stride: 3 }} }}\n'
    out = _run(tmp_path, layers, {"data": (1, 1, 5, 5)})
    np.testing.assert_array_equal(out["p"], caffe_pool(out["feeds"]["data"].astype(np.float64), method, 1, 3, 0, 3).astype(np.float32))


def test_ave_pool_divisor_counts_padding_up_to_the_padded_edge(tmp_path) -> None:
    """Pad 2 with kernel 3 (more than half: PyTorch's pooling refuses it) goes through the explicit path."""
    layers = 'layer { name: "p" type: "Pooling" bottom: "data" top: "p" pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 2 } }\n'
    out = _run(tmp_path, layers, {"data": (1, 2, 6, 6)})
    # ceil((6 + 4 - 3) / 2) + 1 = 5, and the 5th window would start at 8 - 2 = 6, past the image: 4.
    expected = caffe_pool(out["feeds"]["data"].astype(np.float64), "AVE", 3, 2, 2, 4)
    np.testing.assert_allclose(out["p"], expected, atol=1e-6)


@pytest.mark.parametrize("seed", SEEDS)
def test_bias_adds_a_blob_spanning_axis_and_num_axes(tmp_path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    bias = rng.standard_normal((3, 4)).astype(np.float32)
    layers = 'layer { name: "b" type: "Bias" bottom: "data" top: "out" bias_param { axis: 1 num_axes: 2 } }\n'
    out = _run(tmp_path, layers, {"data": (2, 3, 4, 5)}, {"b": [bias]})
    np.testing.assert_allclose(out["out"], out["feeds"]["data"] + bias[None, :, :, None], atol=1e-6)


def test_threshold_is_one_strictly_above(tmp_path) -> None:
    x = np.array([[[[-1.0, 0.3, 0.30000001, 0.5]]]], np.float32)
    layers = 'layer { name: "t" type: "Threshold" bottom: "data" top: "out" threshold_param { threshold: 0.3 } }\n'
    out = _run(tmp_path, layers, {"data": x.shape}, feeds={"data": x})
    np.testing.assert_array_equal(out["out"], (x > np.float32(0.3)).astype(np.float32))


@pytest.mark.parametrize("operation", ["SUM", "ASUM", "SUMSQ", "MEAN"])
def test_reduction_reduces_every_axis_from_axis_on(tmp_path, operation: str) -> None:
    layers = f'layer {{ name: "r" type: "Reduction" bottom: "data" top: "out" reduction_param {{ operation: {operation} axis: 1 coeff: -0.5 }} }}\n'
    out = _run(tmp_path, layers, {"data": (2, 3, 4, 5)})
    x = out["feeds"]["data"].reshape(2, -1).astype(np.float64)
    reduced = {"SUM": x.sum(1), "ASUM": np.abs(x).sum(1), "SUMSQ": (x * x).sum(1), "MEAN": x.mean(1)}[operation]
    np.testing.assert_allclose(out["out"], -0.5 * reduced, rtol=1e-5, atol=1e-5)
    assert out["out"].shape == (2,)


def test_argmax_without_axis_is_caffes_index_then_value_layout(tmp_path) -> None:
    x = np.array([[[[1.0, 5.0], [5.0, 2.0]]], [[[0.0, -1.0], [3.0, 3.0]]]], np.float32)  # ties: larger index first
    layers = 'layer { name: "a" type: "ArgMax" bottom: "data" top: "out" argmax_param { top_k: 2 out_max_val: true } }\n'
    out = _run(tmp_path, layers, {"data": x.shape}, feeds={"data": x})
    expected = np.array([[[[2.0], [1.0]], [[5.0], [5.0]]], [[[3.0], [2.0]], [[3.0], [3.0]]]], np.float32)
    np.testing.assert_array_equal(out["out"], expected)


def test_argmax_with_axis_gives_indices_along_it(tmp_path) -> None:
    layers = 'layer { name: "a" type: "ArgMax" bottom: "data" top: "out" argmax_param { axis: 1 } }\n'
    out = _run(tmp_path, layers, {"data": (2, 5, 3, 4)})
    np.testing.assert_array_equal(out["out"][:, 0], out["feeds"]["data"].argmax(1).astype(np.float32))


@pytest.mark.parametrize("across_channels", [False, True])
def test_mvn_adds_eps_after_the_square_root(tmp_path, across_channels: bool) -> None:
    layers = (
        f'layer {{ name: "m" type: "MVN" bottom: "data" top: "out" mvn_param {{ eps: 0.1 '
        f"across_channels: {str(across_channels).lower()} }} }}\n"
    )
    out = _run(tmp_path, layers, {"data": (2, 3, 4, 5)})
    x = out["feeds"]["data"].astype(np.float64)
    axes = (1, 2, 3) if across_channels else (2, 3)
    centered = x - x.mean(axis=axes, keepdims=True)
    expected = centered / (np.sqrt((centered**2).mean(axis=axes, keepdims=True)) + 0.1)
    np.testing.assert_allclose(out["out"], expected, atol=1e-5)


@pytest.mark.parametrize("seed", SEEDS)
def test_tile_repeats_the_whole_block_from_axis(tmp_path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    axis, tiles = int(rng.integers(0, 4)), int(rng.integers(1, 4))
    layers = f'layer {{ name: "t" type: "Tile" bottom: "data" top: "out" tile_param {{ axis: {axis} tiles: {tiles} }} }}\n'
    out = _run(tmp_path, layers, {"data": (2, 3, 2, 2)})
    reps = [1, 1, 1, 1]
    reps[axis] = tiles
    np.testing.assert_array_equal(out["out"], np.tile(out["feeds"]["data"], reps))


@pytest.mark.parametrize("seed", SEEDS)
def test_log_uses_base_scale_and_shift(tmp_path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    base, scale, shift = float(rng.choice([2.0, 10.0, 3.5])), float(rng.uniform(0.1, 2)), float(rng.uniform(0.5, 3))
    x = np.abs(rng.standard_normal((2, 3, 4, 5))).astype(np.float32)
    layers = f'layer {{ name: "l" type: "Log" bottom: "data" top: "out" log_param {{ base: {base} scale: {scale} shift: {shift} }} }}\n'
    out = _run(tmp_path, layers, {"data": x.shape}, feeds={"data": x})
    expected = np.log(np.float32(shift) + np.float32(scale) * x.astype(np.float64)) / np.log(np.float32(base))
    np.testing.assert_allclose(out["out"], expected, rtol=2e-6, atol=1e-6)


def test_lrn_across_channels_uses_k(tmp_path) -> None:
    layers = 'layer { name: "n" type: "LRN" bottom: "data" top: "out" lrn_param { local_size: 3 alpha: 1.5 beta: 0.75 k: 2 } }\n'
    out = _run(tmp_path, layers, {"data": (1, 5, 3, 3)})
    x = out["feeds"]["data"].astype(np.float64)
    padded = np.pad(x * x, ((0, 0), (1, 1), (0, 0), (0, 0)))
    window = padded[:, :-2] + padded[:, 1:-1] + padded[:, 2:]
    np.testing.assert_allclose(out["out"], x * (2 + 1.5 / 3 * window) ** -0.75, rtol=1e-5)


def _align_corners(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Bilinear resize with corner pixels on corner pixels (the fork's caffe_cpu_interp2)."""
    h, w = x.shape[-2:]
    ys = np.arange(out_h) * ((h - 1) / (out_h - 1) if out_h > 1 else 0)
    xs = np.arange(out_w) * ((w - 1) / (out_w - 1) if out_w > 1 else 0)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    dy, dx = (ys - y0)[:, None], (xs - x0)[None, :]
    top = x[..., y0, :][..., x0] * (1 - dx) + x[..., y0, :][..., x1] * dx
    bottom = x[..., y1, :][..., x0] * (1 - dx) + x[..., y1, :][..., x1] * dx
    return top * (1 - dy) + bottom * dy


@pytest.mark.parametrize("shrink", [2, 3, 4])
def test_interp_shrink_factor_size_and_values(tmp_path, shrink: int) -> None:
    layers = f'layer {{ name: "i" type: "Interp" bottom: "data" top: "out" interp_param {{ shrink_factor: {shrink} }} }}\n'
    out = _run(tmp_path, layers, {"data": (1, 2, 13, 10)})
    size = ((13 - 1) // shrink + 1, (10 - 1) // shrink + 1)
    assert out["out"].shape[-2:] == size
    np.testing.assert_allclose(out["out"], _align_corners(out["feeds"]["data"].astype(np.float64), *size), atol=1e-5)


def test_v1_net_builds_like_its_v2_equivalent(tmp_path) -> None:
    """A V1 prototxt (`layers`, enum types, blobs_lr) and its V2 twin build to the same function."""
    v1 = """name: "v1"
input: "data"
input_dim: 1 input_dim: 2 input_dim: 7 input_dim: 7
layers { name: "conv" type: CONVOLUTION bottom: "data" top: "conv" blobs_lr: 1 blobs_lr: 2
         convolution_param { num_output: 3 kernel_size: 3 stride: 2 pad: 1 } }
layers { name: "relu" type: RELU bottom: "conv" top: "conv" }
layers { name: "pool" type: POOLING bottom: "conv" top: "pool" pooling_param { pool: AVE kernel_size: 2 stride: 2 } }
layers { name: "ip" type: INNER_PRODUCT bottom: "pool" top: "ip" inner_product_param { num_output: 4 } }
layers { name: "prob" type: SOFTMAX bottom: "ip" top: "prob" }
"""
    v2 = """name: "v2"
input: "data"
input_shape { dim: 1 dim: 2 dim: 7 dim: 7 }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" convolution_param { num_output: 3 kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "pool" type: "Pooling" bottom: "conv" top: "pool" pooling_param { pool: AVE kernel_size: 2 stride: 2 } }
layer { name: "ip" type: "InnerProduct" bottom: "pool" top: "ip" inner_product_param { num_output: 4 } }
layer { name: "prob" type: "Softmax" bottom: "ip" top: "prob" }
"""
    from converter.caffe.wire import write_caffemodel

    rng = np.random.default_rng(0)
    blobs = {"conv": [rng.standard_normal((3, 2, 3, 3)).astype(np.float32), rng.standard_normal(3).astype(np.float32)],
             "ip": [rng.standard_normal((4, 12)).astype(np.float32), rng.standard_normal(4).astype(np.float32)]}
    (tmp_path / "v1.prototxt").write_text(v1)
    (tmp_path / "v2.prototxt").write_text(v2)
    write_caffemodel(tmp_path / "w.caffemodel", parse_prototxt_text(v2), blobs)
    a = build_net(load_net(tmp_path / "w.caffemodel", tmp_path / "v1.prototxt"))
    b = build_net(load_net(tmp_path / "w.caffemodel", tmp_path / "v2.prototxt"))
    assert [i.type for i in a.graph.layers] == [i.type for i in b.graph.layers]
    x = torch.randn(1, 2, 7, 7)
    with torch.no_grad():
        assert torch.equal(a(x)["prob"], b(x)["prob"])


def test_normalize_across_spatial_with_a_scale_per_channel(tmp_path) -> None:
    """SSD's Normalize: x / sqrt(sum over C,H,W of x^2 + eps) * scale[c] (OpenCV refuses this combination)."""
    scale = np.array([0.5, 2.0, 3.0], np.float32)
    layers = 'layer { name: "n" type: "Normalize" bottom: "data" top: "out" norm_param { across_spatial: true channel_shared: false } }\n'
    out = _run(tmp_path, layers, {"data": (2, 3, 4, 5)}, {"n": [scale]})
    x = out["feeds"]["data"].astype(np.float64)
    norm = np.sqrt((x * x).sum(axis=(1, 2, 3), keepdims=True) + 1e-10)
    np.testing.assert_allclose(out["out"], x / norm * scale[None, :, None, None], rtol=1e-5)
