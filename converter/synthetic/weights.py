"""Deterministic synthetic DeepLab-v2 caffemodels in the real Caffe binary format, for the demo and tests.

The published weights cannot be downloaded here, so the pipeline runs on files made like them:
He-normal convolutions, Scale gamma/beta, ASPP weights as Caffe's gaussian filler draws them with
non-zero biases, and BatchNorm blobs [mean*s, var*s, [s]] with moving-average factors s != 1.
Random statistics would blow activations up through 33 residual blocks, so every BatchNorm is
calibrated in forward order on a synthetic image: it takes the batch mean/variance of its input,
so activations keep a realistic scale up to res5c and the head. A few channels are shrunk until
their variance is of the order of eps, so that an eps mistake changes the output visibly.

Same seed, same bytes on any machine: weights come from numpy's PCG64 (float64 draws cast to
float32), calibration runs in float64 and its statistics are rounded to 12 significant bits
before they are used or stored, which absorbs the last-bit differences between CPUs, BLAS
builds and thread counts. File names mirror the release: the multi-scale net's weights are
`train_iter_20000.caffemodel` (the shared tower weights stored once per tower, as the deeplab-v2
fork saves them), the COCO-head net's `init.caffemodel`.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from google.protobuf import text_format

from converter.atomic import write_atomic
from converter.caffe.params import DEFAULT_BN_EPS
from converter.checkpoint import sha256_file
from converter.deeplab.names import head_layer_names, name_map, tower_copy_names
from converter.synthetic.netspec import KINDS, deeplab_net_param, kind_defaults
from converter.caffe.schema import caffe_pb
from converter.caffe.wire import write_caffemodel
from models.alignment import VOC_MEAN_BGR
from models.deeplab import HEAD_WEIGHT_STD, DeepLabV2, ResNetConfig

log = logging.getLogger(__name__)

CONFIGS: dict[str, Callable[[], ResNetConfig]] = {"tiny": ResNetConfig.tiny, "resnet101": ResNetConfig.resnet101}

# (prototxt, caffemodel) file names per kind, after the release's files.
FILE_NAMES = {
    "msc_test": ("test.prototxt", "train_iter_20000.caffemodel"),
    "single_scale": ("test_scale1.prototxt", "scale1.caffemodel"),
    "init": ("init.prototxt", "init.caffemodel"),
}

STAT_BITS = 12  # significant bits kept of calibrated statistics (machine-independent bytes)
FACTOR_RANGE = (0.5, 1000.0)  # moving-average factor s, log-uniform; Caffe's converges to 1/(1-0.999)
GAMMA_RANGE = (0.5, 1.5)
BETA_STD = 0.1
HEAD_BIAS_STD = 0.05  # non-zero so that a bias mapping error shows
# BatchNorm layers (present in every config) where a few channels get a variance near eps.
NEAR_EPS_LAYERS = ("bn_conv1", "bn2a_branch2b", "bn4a_branch2a", "bn5a_branch2c")
NEAR_EPS_VAR_LOG10 = (-6.0, -4.5)
CALIBRATION_SIZE = (321, 321)  # fixed, so the weights do not depend on the declared input size


@dataclass(frozen=True)
class SyntheticFiles:
    """A written synthetic net: its prototxt, its caffemodel and the caffemodel's sha256."""

    prototxt: Path
    caffemodel: Path
    sha256: str


def calibration_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A deterministic mean-subtracted BGR image (1, 3, H, W) float32: smooth colour fields, boxes, noise.

    Built from elementwise arithmetic only (no transcendental functions, no BLAS), rounded to 1/8,
    so its bytes are the same on every machine.
    """
    rng = np.random.default_rng([seed, 1])
    coarse = rng.uniform(0.0, 255.0, size=(3, 7, 7))
    image = _upsample_bilinear(coarse, height, width)
    for _ in range(6):
        top, left = rng.integers(0, height), rng.integers(0, width)
        bottom = top + rng.integers(height // 8, height // 2 + 1)
        right = left + rng.integers(width // 8, width // 2 + 1)
        image[:, top:bottom, left:right] = rng.uniform(0.0, 255.0, size=(3, 1, 1))
    image += rng.standard_normal((3, height, width)) * 12.0
    image = np.clip(image, 0.0, 255.0) - np.asarray(VOC_MEAN_BGR).reshape(3, 1, 1)
    return (np.round(image * 8.0) / 8.0).astype(np.float32)[None]


def synthetic_blobs(
    config: ResNetConfig,
    seed: int = 0,
    num_classes: int = 21,
    head_name: str = "fc1_voc12",
    near_eps: bool = True,
) -> dict[str, list[np.ndarray]]:
    """Caffe blobs (float32, Caffe shapes) of every parameter layer of one tower and the head, calibrated.

    `near_eps=False` leaves out the near-eps BatchNorm channels (they catch eps mistakes in conversion,
    but would magnify updates 300x in training: the demo's training init has none).
    """
    rng = np.random.default_rng([seed, 0])
    net = deeplab_net_param("single_scale", config, num_classes, CALIBRATION_SIZE, head_name)
    blobs = _draw_blobs(net, head_name, rng)
    near_eps_channels = {
        layer: (
            np.sort(rng.choice(len(blobs[layer][0]), size=max(1, len(blobs[layer][0]) // 64), replace=False)),
            float(_round_significant(10.0 ** rng.uniform(*NEAR_EPS_VAR_LOG10), STAT_BITS)),
        )
        for layer in (NEAR_EPS_LAYERS if near_eps else ())
    }
    conv_of_bn = {layer.name: layer.bottom[0] for layer in net.layer if layer.type == "BatchNorm"}
    image = calibration_image(*CALIBRATION_SIZE, seed=seed)
    _calibrate(config, num_classes, head_name, blobs, conv_of_bn, near_eps_channels, image)
    return blobs


def write_synthetic_deeplab(
    out_dir: str | Path,
    kind: str,
    config: ResNetConfig,
    seed: int = 0,
    num_classes: int | None = None,
    input_size: tuple[int, int] = (321, 321),
    near_eps: bool = True,
) -> SyntheticFiles:
    """Write the `kind` net's prototxt and a calibrated synthetic caffemodel into `out_dir`.

    The caffemodel carries the full layer definitions as Caffe's `Net::ToProto` saves them (with
    `phase: TEST`), so it converts without the prototxt. Same arguments, same bytes.
    """
    head_name, default_classes = kind_defaults(kind)
    classes = default_classes if num_classes is None else num_classes
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prototxt_name, caffemodel_name = FILE_NAMES[kind]
    started = time.perf_counter()
    blobs = synthetic_blobs(config, seed, classes, head_name, near_eps)
    log.info("drew and calibrated %d layers' blobs in %.1f s", len(blobs), time.perf_counter() - started)
    net = deeplab_net_param(kind, config, classes, input_size, head_name)
    if kind == "msc_test":
        for layer in list(blobs):
            for copy in tower_copy_names(layer, head_name):
                blobs[copy] = blobs[layer]
    prototxt = out / prototxt_name
    text = text_format.MessageToString(net)
    write_atomic(prototxt, lambda path: path.write_text(text))
    saved = caffe_pb().NetParameter()
    saved.CopyFrom(net)
    for layer in saved.layer:
        layer.phase = caffe_pb().TEST
    caffemodel = out / caffemodel_name
    write_caffemodel(caffemodel, saved, blobs)
    digest = sha256_file(caffemodel)
    log.info("synthetic %s caffemodel: %d bytes, sha256 %s, %.1f s in all", kind, caffemodel.stat().st_size,
             digest, time.perf_counter() - started)
    return SyntheticFiles(prototxt=prototxt, caffemodel=caffemodel, sha256=digest)


def _draw_blobs(net: Any, head_name: str, rng: np.random.Generator) -> dict[str, list[np.ndarray]]:
    """Random blobs in layer order; BatchNorm statistics are placeholders until calibration."""
    channels = {"data": 3}
    blobs: dict[str, list[np.ndarray]] = {}
    head_layers = set(head_layer_names(head_name))
    for layer in net.layer:
        if layer.type == "Convolution":
            cp = layer.convolution_param
            kernel = cp.kernel_size[0]
            shape = (cp.num_output, channels[layer.bottom[0]], kernel, kernel)
            if layer.name in head_layers:
                weight = _normal(rng, shape, HEAD_WEIGHT_STD)
                blobs[layer.name] = [weight, _normal(rng, (cp.num_output,), HEAD_BIAS_STD)]
            else:
                blobs[layer.name] = [_normal(rng, shape, np.sqrt(2.0 / np.prod(shape[1:])))]
            channels[layer.top[0]] = cp.num_output
            continue
        width = channels[layer.bottom[0]] if layer.bottom else 0
        for top in layer.top:
            channels[top] = width
        if layer.type == "BatchNorm":
            log_factor = rng.uniform(np.log(FACTOR_RANGE[0]), np.log(FACTOR_RANGE[1]))
            factor = np.float32(_round_significant(np.exp(log_factor), STAT_BITS))
            zeros = np.zeros(width, np.float32)
            blobs[layer.name] = [zeros, zeros.copy(), np.array([factor], np.float32)]
        elif layer.type == "Scale":
            gamma = rng.uniform(*GAMMA_RANGE, size=width).astype(np.float32)
            blobs[layer.name] = [gamma, _normal(rng, (width,), BETA_STD)]
    return blobs


def _calibrate(
    config: ResNetConfig,
    num_classes: int,
    head_name: str,
    blobs: dict[str, list[np.ndarray]],
    conv_of_bn: dict[str, str],
    near_eps: dict[str, tuple[np.ndarray, float]],
    image: np.ndarray,
) -> None:
    """Fill every BatchNorm's statistics from its input on `image`, in forward order (float64, CPU).

    Each BatchNorm module, when reached, takes its input's per-channel mean and (biased) variance,
    rounded to STAT_BITS significant bits, and then normalises with them; so everything downstream
    sees the statistics exactly as stored. In NEAR_EPS_LAYERS the chosen channels' convolution
    weights are first scaled so that their variance lands near eps.
    """
    model = DeepLabV2(num_classes=num_classes, config=config, bn_eps=DEFAULT_BN_EPS).double().eval()
    rows = name_map(config, head_name)
    # BatchNorm statistics are still placeholders here; each hook sets its own before use.
    model.load_state_dict({row.key: torch.from_numpy(blobs[row.layer][row.index]).double()
                           for row in rows if row.key is not None})

    def calibrate_hook(bn_layer: str) -> Callable[[torch.nn.Module, tuple], tuple]:
        def hook(module: torch.nn.Module, args: tuple) -> tuple:
            x = args[0]
            if bn_layer in near_eps:
                x = _shrink_channels(x, blobs[conv_of_bn[bn_layer]][0], *near_eps[bn_layer])
            mean = _round_significant(x.mean(dim=(0, 2, 3)).numpy(), STAT_BITS)
            var = _round_significant(x.var(dim=(0, 2, 3), unbiased=False).numpy(), STAT_BITS)
            module.running_mean.copy_(torch.from_numpy(mean))
            module.running_var.copy_(torch.from_numpy(var))
            factor = blobs[bn_layer][2]
            blobs[bn_layer][:2] = [mean.astype(np.float32) * factor[0], var.astype(np.float32) * factor[0]]
            return (x,) + tuple(args[1:])

        return hook

    for row in rows:
        if row.kind == "bn_mean":
            model.get_submodule(row.key.rsplit(".", 1)[0]).register_forward_pre_hook(calibrate_hook(row.layer))
    with torch.no_grad():
        model(torch.from_numpy(image).double())


def _shrink_channels(x: torch.Tensor, conv_weight: np.ndarray, channels: np.ndarray, target_var: float) -> torch.Tensor:
    """Scale `channels` of the conv output `x` (and their conv weights, in place) to variance ~target_var."""
    var = x[:, channels].var(dim=(0, 2, 3), unbiased=False).numpy()
    factors = _round_significant(np.sqrt(target_var / var), 8)
    conv_weight[channels] *= factors.astype(np.float32).reshape(-1, 1, 1, 1)
    x = x.clone()
    x[:, channels] *= torch.from_numpy(factors).reshape(1, -1, 1, 1)
    return x


def _round_significant(values: np.ndarray, bits: int) -> np.ndarray:
    """`values` rounded to `bits` significant bits (exact binary arithmetic: same result on every machine)."""
    mantissa, exponent = np.frexp(np.asarray(values, np.float64))
    return np.ldexp(np.round(mantissa * 2.0**bits) / 2.0**bits, exponent)


def _normal(rng: np.random.Generator, shape: Sequence[int], std: float) -> np.ndarray:
    return (rng.standard_normal(tuple(shape)) * std).astype(np.float32)


def _upsample_bilinear(coarse: np.ndarray, height: int, width: int) -> np.ndarray:
    """(C, h, w) -> (C, height, width), corners aligned, with elementwise arithmetic only."""

    def axis(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        position = np.arange(n_out) * (n_in - 1) / max(n_out - 1, 1)
        low = np.minimum(position.astype(np.int64), n_in - 2)
        return low, low + 1, (position - low)

    y0, y1, wy = axis(coarse.shape[1], height)
    x0, x1, wx = axis(coarse.shape[2], width)
    rows = coarse[:, y0] * (1 - wy)[None, :, None] + coarse[:, y1] * wy[None, :, None]
    return rows[:, :, x0] * (1 - wx) + rows[:, :, x1] * wx


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: write a synthetic DeepLab-v2 prototxt + caffemodel and print their paths and sha256."""
    parser = argparse.ArgumentParser(prog="python -m converter.synthetic", description=main.__doc__)
    parser.add_argument("--kind", choices=KINDS, required=True)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="resnet101")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="folder that receives the files")
    parser.add_argument("--classes", type=int, default=None, help="head classes (default: 21, or 91 for init)")
    parser.add_argument("--size", type=int, nargs=2, default=(321, 321), metavar=("H", "W"))
    parser.add_argument("--sha256-only", action="store_true", help="print only the caffemodel's sha256")
    parser.add_argument("--no-near-eps", action="store_true", help="no near-eps BatchNorm channels (an init to train from)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    files = write_synthetic_deeplab(args.out, args.kind, CONFIGS[args.config](), args.seed, args.classes,
                                    tuple(args.size), near_eps=not args.no_near_eps)
    if args.sha256_only:
        print(files.sha256)
    else:
        print(f"prototxt: {files.prototxt}\ncaffemodel: {files.caffemodel}\nsha256: {files.sha256}")
    return 0

