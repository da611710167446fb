"""Small random Caffe nets for the layer registry's tests: write them in the real formats, run them
through the registry and through OpenCV 4.x dnn (an independent Caffe implementation)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from converter.caffe.load import load_net
from converter.caffe.prototxt import parse_prototxt_text, read_prototxt
from converter.caffe.wire import write_caffemodel
from converter.layers import CaffeNet, build_net
from verify.opencv_reference import BlobGraph


@dataclass
class RandomNet:
    """A net as prototxt text (without inputs), its input shapes and blobs per layer."""

    layers: str
    inputs: dict[str, tuple[int, ...]]
    blobs: dict[str, list[np.ndarray]] = field(default_factory=dict)

    def text(self, name: str = "random") -> str:
        head = f'name: "{name}"\n'
        for blob, shape in self.inputs.items():
            dims = " ".join(f"dim: {d}" for d in shape)
            head += f'layer {{ name: "{blob}_input" type: "Input" top: "{blob}" input_param {{ shape {{ {dims} }} }} }}\n'
        return head + self.layers

    def write(self, folder: Path, name: str = "random") -> tuple[Path, Path]:
        """(prototxt, caffemodel) in `folder`, the caffemodel in Caffe's binary format."""
        folder.mkdir(parents=True, exist_ok=True)
        prototxt = folder / f"{name}.prototxt"
        caffemodel = folder / f"{name}.caffemodel"
        prototxt.write_text(self.text(name))
        write_caffemodel(caffemodel, parse_prototxt_text(self.text(name)), self.blobs)
        return prototxt, caffemodel

    def feeds(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        return {blob: rng.standard_normal(shape).astype(np.float32) for blob, shape in self.inputs.items()}


def registry_blobs(prototxt: Path, caffemodel: Path | None, feeds: Mapping[str, np.ndarray]) -> tuple[CaffeNet, dict]:
    """The built net and every blob it computes (numpy), through load_net + build_net."""
    net = build_net(load_net(caffemodel, prototxt))
    with torch.no_grad():
        blobs = net.run({k: torch.from_numpy(v) for k, v in feeds.items()}, keep="all")
    return net, {name: value.numpy() for name, value in blobs.items()}


def opencv_blobs(prototxt: Path, caffemodel: Path | None, feeds: Mapping[str, np.ndarray], names: Sequence[str]) -> dict:
    """The named blobs as OpenCV 4.x dnn computes them (plain CPU backend, no fusion), each asked
    of the layer that writes its final value."""
    import cv2

    graph = BlobGraph.of(read_prototxt(prototxt))
    net = cv2.dnn.readNetFromCaffe(str(prototxt), str(caffemodel)) if caffemodel else cv2.dnn.readNetFromCaffe(str(prototxt))
    net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    net.setPreferableTarget(cv2.dnn.DNN_TARGET_CPU)
    net.enableFusion(False)
    for blob, value in feeds.items():
        net.setInput(value, blob)
    writers = list(dict.fromkeys(graph.last_writer[name][0] for name in names))
    outputs = dict(zip(writers, net.forwardAndRetrieve(writers)))
    return {name: np.asarray(outputs[graph.last_writer[name][0]][graph.last_writer[name][1]]) for name in names}


def assert_close(ours: np.ndarray, theirs: np.ndarray, what: str, *, mean_abs: float = 1e-5, max_abs: float = 1e-4) -> None:
    """OpenCV's Caffe-test tolerances (CASES.md), scaled by the reference's magnitude when it exceeds 1."""
    assert ours.shape == theirs.shape, f"{what}: shape {ours.shape} != {theirs.shape}"
    scale = max(1.0, float(np.max(np.abs(theirs))) if theirs.size else 1.0)
    diff = np.abs(ours.astype(np.float64) - theirs.astype(np.float64))
    assert diff.mean() <= mean_abs * scale, f"{what}: mean abs diff {diff.mean():.3g} (scale {scale:.3g})"
    assert diff.max() <= max_abs * scale, f"{what}: max abs diff {diff.max():.3g} (scale {scale:.3g})"


# --------------------------------------------------------------------------- random layers


def _normal(rng: np.random.Generator, *shape: int, std: float = 1.0) -> np.ndarray:
    return (rng.standard_normal(shape) * std).astype(np.float32)


def conv_net(rng: np.random.Generator) -> RandomNet:
    """Convolution with random kernel/stride/pad/dilation (scalar or _h/_w), groups, bias on or off."""
    group = int(rng.choice([1, 2, 3]))
    cin = group * int(rng.integers(1, 4))
    cout = group * int(rng.integers(1, 4))
    kh, kw = (int(k) for k in rng.integers(1, 5, 2))
    sh, sw = (int(s) for s in rng.integers(1, 4, 2))
    ph, pw = (int(p) for p in rng.integers(0, 3, 2))
    dilation = int(rng.integers(1, 3))
    bias = bool(rng.integers(0, 2))
    h, w = int(rng.integers(kh * dilation + 2, 14)), int(rng.integers(kw * dilation + 2, 14))
    geometry = f"kernel_h: {kh} kernel_w: {kw} stride_h: {sh} stride_w: {sw} pad_h: {ph} pad_w: {pw} dilation: {dilation}"
    layers = (
        f'layer {{ name: "conv" type: "Convolution" bottom: "data" top: "conv" convolution_param {{ num_output: {cout} '
        f"{geometry} group: {group} bias_term: {str(bias).lower()} }} }}\n"
    )
    blobs = [_normal(rng, cout, cin // group, kh, kw, std=0.5)] + ([_normal(rng, cout)] if bias else [])
    return RandomNet(layers, {"data": (2, cin, h, w)}, {"conv": blobs})


def deconv_net(rng: np.random.Generator) -> RandomNet:
    group = int(rng.choice([1, 2]))
    cin, cout = group * int(rng.integers(1, 4)), group * int(rng.integers(1, 3))
    k, s, p = int(rng.integers(1, 5)), int(rng.integers(1, 3)), int(rng.integers(0, 2))
    p = min(p, k - 1)
    layers = (
        f'layer {{ name: "deconv" type: "Deconvolution" bottom: "data" top: "deconv" convolution_param {{ '
        f"num_output: {cout} kernel_size: {k} stride: {s} pad: {p} group: {group} }} }}\n"
    )
    blobs = [_normal(rng, cin, cout // group, k, k, std=0.5), _normal(rng, cout)]
    return RandomNet(layers, {"data": (1, cin, int(rng.integers(3, 8)), int(rng.integers(3, 8)))}, {"deconv": blobs})


def pool_net(rng: np.random.Generator) -> RandomNet:
    """MAX or AVE, ceil rounding, pads below the kernel, sizes where ceil and floor differ."""
    method = str(rng.choice(["MAX", "AVE"]))
    k = int(rng.integers(2, 5))
    s = int(rng.integers(1, k + 1))
    p = int(rng.integers(0, k // 2 + 1)) if k > 1 else 0
    h, w = int(rng.integers(k + 1, 16)), int(rng.integers(k + 1, 16))
    layers = (
        f'layer {{ name: "pool" type: "Pooling" bottom: "data" top: "pool" pooling_param {{ pool: {method} '
        f"kernel_size: {k} stride: {s} pad: {p} }} }}\n"
    )
    return RandomNet(layers, {"data": (2, 3, h, w)})


def global_pool_net(rng: np.random.Generator) -> RandomNet:
    method = str(rng.choice(["MAX", "AVE"]))
    layers = f'layer {{ name: "pool" type: "Pooling" bottom: "data" top: "pool" pooling_param {{ pool: {method} global_pooling: true }} }}\n'
    return RandomNet(layers, {"data": (2, 4, int(rng.integers(2, 9)), int(rng.integers(2, 9)))})


def lrn_net(rng: np.random.Generator) -> RandomNet:
    region = str(rng.choice(["ACROSS_CHANNELS", "WITHIN_CHANNEL"]))
    size = int(rng.choice([1, 3, 5]))
    # k stays 1: OpenCV ignores it (test_layers_numpy pins Caffe's use of it against a numpy reference).
    alpha, beta, k = float(rng.uniform(0.1, 2)), float(rng.uniform(0.5, 1)), 1.0
    layers = (
        f'layer {{ name: "lrn" type: "LRN" bottom: "data" top: "lrn" lrn_param {{ local_size: {size} alpha: {alpha} '
        f"beta: {beta} k: {k} norm_region: {region} }} }}\n"
    )
    return RandomNet(layers, {"data": (1, 7, 6, 5)})


def batchnorm_scale_net(rng: np.random.Generator) -> RandomNet:
    """BatchNorm (random moving-average factor, eps) + Scale with bias, in place as in ResNets."""
    c = int(rng.integers(1, 6))
    factor = np.array([float(rng.uniform(0.5, 1000))], np.float32)
    eps = float(rng.choice([1e-5, 1e-3]))
    layers = (
        f'layer {{ name: "bn" type: "BatchNorm" bottom: "data" top: "data" batch_norm_param {{ use_global_stats: true eps: {eps} }} }}\n'
        'layer { name: "scale" type: "Scale" bottom: "data" top: "data" scale_param { bias_term: true } }\n'
    )
    mean = _normal(rng, c) * factor
    var = rng.uniform(0.2, 2, c).astype(np.float32) * factor
    blobs = {"bn": [mean, var, factor], "scale": [_normal(rng, c), _normal(rng, c)]}
    return RandomNet(layers, {"data": (2, c, 4, 3)}, blobs)


def activations_net(rng: np.random.Generator) -> RandomNet:
    """A chain of elementwise layers OpenCV implements as Caffe defines them."""
    slope = float(rng.uniform(0, 0.5))
    power, scale, shift = float(rng.choice([1.0, 2.0, 0.5])), float(rng.uniform(0.5, 2)), float(rng.uniform(0.5, 2))
    alpha = float(rng.uniform(0.5, 2))
    layers = (
        f'layer {{ name: "relu" type: "ReLU" bottom: "data" top: "relu" relu_param {{ negative_slope: {slope} }} }}\n'
        f'layer {{ name: "elu" type: "ELU" bottom: "data" top: "elu" elu_param {{ alpha: {alpha} }} }}\n'
        'layer { name: "sigmoid" type: "Sigmoid" bottom: "data" top: "sigmoid" }\n'
        'layer { name: "tanh" type: "TanH" bottom: "data" top: "tanh" }\n'
        'layer { name: "abs" type: "AbsVal" bottom: "data" top: "abs" }\n'
        'layer { name: "bnll" type: "BNLL" bottom: "data" top: "bnll" }\n'
        f'layer {{ name: "power" type: "Power" bottom: "abs" top: "power" power_param {{ power: {power} scale: {scale} shift: {shift} }} }}\n'
        'layer { name: "exp" type: "Exp" bottom: "tanh" top: "exp" }\n'
        'layer { name: "drop" type: "Dropout" bottom: "exp" top: "exp" dropout_param { dropout_ratio: 0.3 } }\n'
        'layer { name: "silence" type: "Silence" bottom: "relu" bottom: "elu" bottom: "sigmoid" bottom: "bnll" bottom: "power" }\n'
    )
    return RandomNet(layers, {"data": (2, 3, 4, 5)})


def prelu_net(rng: np.random.Generator) -> RandomNet:
    shared = bool(rng.integers(0, 2))
    c = int(rng.integers(1, 5))
    layers = f'layer {{ name: "prelu" type: "PReLU" bottom: "data" top: "prelu" prelu_param {{ channel_shared: {str(shared).lower()} }} }}\n'
    return RandomNet(layers, {"data": (2, c, 3, 3)}, {"prelu": [_normal(rng, 1 if shared else c, std=0.3)]})


def inner_product_net(rng: np.random.Generator) -> RandomNet:
    c, h, w, n = int(rng.integers(1, 4)), int(rng.integers(1, 4)), int(rng.integers(1, 4)), int(rng.integers(1, 6))
    bias = bool(rng.integers(0, 2))
    layers = f'layer {{ name: "ip" type: "InnerProduct" bottom: "data" top: "ip" inner_product_param {{ num_output: {n} bias_term: {str(bias).lower()} }} }}\n'
    blobs = [_normal(rng, n, c * h * w)] + ([_normal(rng, n)] if bias else [])
    return RandomNet(layers, {"data": (2, c, h, w)}, {"ip": blobs})


def eltwise_net(rng: np.random.Generator) -> RandomNet:
    operation = str(rng.choice(["SUM", "PROD", "MAX"]))
    coeffs = ""
    if operation == "SUM" and rng.integers(0, 2):
        coeffs = " ".join(f"coeff: {float(c):.3f}" for c in rng.uniform(-2, 2, 3))
    layers = (
        f'layer {{ name: "eltwise" type: "Eltwise" bottom: "a" bottom: "b" bottom: "c" top: "eltwise" '
        f"eltwise_param {{ operation: {operation} {coeffs} }} }}\n"
    )
    shape = (2, 3, int(rng.integers(1, 5)), int(rng.integers(1, 5)))
    return RandomNet(layers, {"a": shape, "b": shape, "c": shape})


def concat_slice_net(rng: np.random.Generator) -> RandomNet:
    """Concat along a random axis, Slice it back at random points, Flatten and Softmax."""
    axis = int(rng.integers(1, 4))
    a = [2, 3, 4, 5]
    b = list(a)
    b[axis] = int(rng.integers(1, 4))
    total = a[axis] + b[axis]
    point = int(rng.integers(1, total))
    layers = (
        f'layer {{ name: "concat" type: "Concat" bottom: "a" bottom: "b" top: "concat" concat_param {{ axis: {axis} }} }}\n'
        f'layer {{ name: "slice" type: "Slice" bottom: "concat" top: "s1" top: "s2" slice_param {{ axis: {axis} slice_point: {point} }} }}\n'
        'layer { name: "flatten" type: "Flatten" bottom: "s1" top: "flat" }\n'
        f'layer {{ name: "softmax" type: "Softmax" bottom: "s2" top: "prob" softmax_param {{ axis: {axis} }} }}\n'
    )
    return RandomNet(layers, {"a": tuple(a), "b": tuple(b)})


def reshape_permute_net(rng: np.random.Generator) -> RandomNet:
    order = [0] + [int(d) + 1 for d in rng.permutation(3)]
    layers = (
        f'layer {{ name: "permute" type: "Permute" bottom: "data" top: "permuted" permute_param {{ {" ".join(f"order: {d}" for d in order)} }} }}\n'
        'layer { name: "reshape" type: "Reshape" bottom: "permuted" top: "reshaped" reshape_param { shape { dim: 0 dim: -1 dim: 2 } } }\n'
    )
    return RandomNet(layers, {"data": (2, 2, 3, 4)})


def scale_bias_axes_net(rng: np.random.Generator) -> RandomNet:
    """Scale with axis/num_axes spanning more than the channels, and Scale by a second bottom."""
    layers = (
        'layer { name: "scale" type: "Scale" bottom: "data" top: "scaled" scale_param { axis: 1 num_axes: 2 bias_term: true } }\n'
        'layer { name: "scale2" type: "Scale" bottom: "data" bottom: "gamma" top: "scaled2" scale_param { axis: 1 } }\n'
    )
    blobs = {"scale": [_normal(rng, 3, 4), _normal(rng, 3, 4)]}
    return RandomNet(layers, {"data": (2, 3, 4, 5), "gamma": (3, 4)}, blobs)


def normalize_crop_exp_net(rng: np.random.Generator) -> RandomNet:
    """SSD's Normalize (random across_spatial / channel_shared), Crop at random offsets, Exp with a base."""
    across, shared = (bool(v) for v in rng.integers(0, 2, 2))
    shared = shared or across  # OpenCV 4.14 asserts on a per-channel scale with across_spatial (test_layers_numpy covers it)
    c, h, w = 3, int(rng.integers(4, 8)), int(rng.integers(4, 8))
    ch, cw = int(rng.integers(1, h)), int(rng.integers(1, w))
    oh, ow = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    base, scale, shift = float(rng.choice([2.0, 10.0])), float(rng.uniform(0.2, 1)), float(rng.uniform(-1, 1))
    layers = (
        f'layer {{ name: "norm" type: "Normalize" bottom: "data" top: "norm" norm_param {{ '
        f"across_spatial: {str(across).lower()} channel_shared: {str(shared).lower()} }} }}\n"
        f'layer {{ name: "crop" type: "Crop" bottom: "norm" bottom: "like" top: "crop" crop_param {{ axis: 2 offset: {oh} offset: {ow} }} }}\n'
        f'layer {{ name: "exp" type: "Exp" bottom: "crop" top: "exp" exp_param {{ base: {base} scale: {scale} shift: {shift} }} }}\n'
    )
    blobs = {"norm": [rng.uniform(0.5, 2, 1 if shared else c).astype(np.float32)]}
    return RandomNet(layers, {"data": (2, c, h, w), "like": (2, c, ch, cw)}, blobs)


def interp_net(rng: np.random.Generator) -> RandomNet:
    """The DeepLab fork's Interp by zoom_factor or by explicit height/width (OpenCV has no shrink_factor)."""
    if rng.integers(0, 2):
        params = f"zoom_factor: {int(rng.integers(2, 9))}"
    else:
        params = f"height: {int(rng.integers(2, 20))} width: {int(rng.integers(2, 20))}"
    layers = f'layer {{ name: "interp" type: "Interp" bottom: "data" top: "interp" interp_param {{ {params} }} }}\n'
    return RandomNet(layers, {"data": (2, 3, int(rng.integers(2, 9)), int(rng.integers(2, 9)))})


OPENCV_CASES: dict[str, Callable[[np.random.Generator], RandomNet]] = {
    "interp": interp_net,
    "normalize_crop_exp": normalize_crop_exp_net,
    "convolution": conv_net,
    "deconvolution": deconv_net,
    "pooling": pool_net,
    "global_pooling": global_pool_net,
    "lrn": lrn_net,
    "batchnorm_scale": batchnorm_scale_net,
    "activations": activations_net,
    "prelu": prelu_net,
    "inner_product": inner_product_net,
    "eltwise": eltwise_net,
    "concat_slice": concat_slice_net,
    "reshape_permute": reshape_permute_net,
    "scale_axes": scale_bias_axes_net,
}
