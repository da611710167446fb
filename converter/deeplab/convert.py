"""A DeepLab-v2 Caffe net (layers + blobs) -> the state dict of models.deeplab, checked one-to-one.

Every blob the name map uses is consumed exactly once, every key of the model is filled
with the shape the model has, and nothing else in the net carries weights except the
multi-scale tower copies, which must equal the full tower's blobs. Failures name both the
Caffe side and the PyTorch side. Weights stay zero-copy views of the reader's arrays; only
the BatchNorm statistics are new arrays (divided by Caffe's moving-average factor). NaN/inf
blobs are rejected by the reader, which sees every blob first.
"""

from __future__ import annotations

import ctypes
import logging
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from converter.caffe.consistency import check_unique_names
from converter.caffe.files import release_pages
from converter.caffe.netdesc import Layer, Net
from converter.caffe.params import DEFAULT_BN_EPS, axis_pair, bn_eps, bn_statistics
from converter.deeplab.names import (
    CAFFE_STAGES,
    LAYER_TYPE_OF_KIND,
    BlobRow,
    caffe_block_name,
    detect_head_name,
    head_layer_names,
    name_map,
    tower_copy_names,
)
from converter.errors import CaffeError, listed
from models.deeplab import ASPPHead, ResNetBackbone, ResNetConfig

log = logging.getLogger(__name__)

_memcmp = ctypes.CDLL(None).memcmp  # the C library's, already loaded in the process
_memcmp.restype = ctypes.c_int
_memcmp.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)


@dataclass(frozen=True)
class Coverage:
    """How much of the net the conversion accounted for."""

    layers_read: int
    layers_with_blobs: int
    blobs_consumed: int
    keys_filled: int
    tower_copies_checked: int
    tower_blobs_checked: int

    def as_dict(self) -> dict[str, int]:
        """JSON-ready form for the checkpoint manifest."""
        return dict(self.__dict__)


@dataclass(frozen=True)
class ConversionResult:
    """The converted weights and what the conversion learned from the net."""

    state_dict: dict[str, torch.Tensor]
    config: ResNetConfig
    num_classes: int
    head_name: str
    bn_eps: float
    coverage: Coverage


def _first_blob(net: Net, layer_name: str) -> np.ndarray:
    if not net.has_layer(layer_name) or not net.layer(layer_name).blobs:
        what = "has no weights (the weights file has no layer of this name)" if net.has_layer(layer_name) else "missing"
        raise CaffeError(f"layer {what}: not a DeepLab-v2 ResNet with this head", path=net.path, layer=layer_name)
    return net.layer(layer_name).blobs[0]


def infer_config(net: Net) -> ResNetConfig:
    """Block counts from the layer names res<stage><block>_branch2a, widths from their weight shapes."""
    blocks = []
    for stage in CAFFE_STAGES:
        count = 0
        while net.has_layer(f"res{stage}{caffe_block_name(stage, count)}_branch2a"):
            count += 1
        blocks.append(count)
    widths = tuple(int(_first_blob(net, f"res{stage}a_branch2a").shape[0]) for stage in CAFFE_STAGES)
    stem_width = int(_first_blob(net, "conv1").shape[0])
    return ResNetConfig(blocks=tuple(blocks), stem_width=stem_width, widths=widths)


def net_bn_eps(net: Net) -> float:
    """The one eps of all BatchNorm layers in the net definition (Caffe's default 1e-5 when unset)."""
    by_eps: dict[float, str] = {}
    for layer in net.layers:
        if layer.type == "BatchNorm":
            by_eps.setdefault(bn_eps(layer, net.definition_path), layer.name)
    if len(by_eps) > 1:
        shown = ", ".join(f"{eps:g} (e.g. layer '{name}')" for eps, name in by_eps.items())
        raise CaffeError(f"BatchNorm layers use different eps: {shown}; the model has one eps",
                         path=net.definition_path)
    return next(iter(by_eps), DEFAULT_BN_EPS)


def _check_conv_geometry(layer: Layer, module: torch.nn.Conv2d, key: str, path: str) -> None:
    """The Caffe layer's stride, pad and dilation must be the model's (weights alone do not show them)."""
    param = layer.param.convolution_param
    caffe = (
        axis_pair(param, "stride", 1),
        axis_pair(param, "pad", 0),
        axis_pair(param, "dilation", 1),
    )
    model = (tuple(module.stride), tuple(module.padding), tuple(module.dilation))
    if caffe != model:
        raise CaffeError(
            f"caffe stride/pad/dilation {caffe} != {key.rsplit('.', 1)[0]} {model}", path=path, layer=layer.name
        )


def _shape_model(config: ResNetConfig, num_classes: int) -> torch.nn.Module:
    """DeepLabV2's modules for their keys, shapes and conv geometry, without memory for the backbone.

    The backbone is built on the meta device; the head is built on the CPU (a few MB) because
    its gaussian init on meta tensors makes torch import torch._dynamo, which costs seconds.
    Same submodule names as DeepLabV2 (tests pin the key set against DeepLabV2 itself).
    """
    with torch.device("meta"):
        backbone = ResNetBackbone(config, DEFAULT_BN_EPS)
    return torch.nn.ModuleDict({"backbone": backbone, "aspp": ASPPHead(config.out_channels, num_classes)})


def _fit(blob: np.ndarray, shape: tuple[int, ...]) -> np.ndarray | None:
    """`blob` in `shape`: as is, or a legacy 4-D blob (1,1,..,C) viewed in its real shape; None if neither."""
    if blob.shape == shape:
        return blob
    lead = blob.ndim - len(shape)
    if blob.ndim == 4 and lead > 0 and all(d == 1 for d in blob.shape[:lead]) and blob.shape[lead:] == shape:
        return blob.reshape(shape)
    return None


def _describe(row: BlobRow, blob: np.ndarray) -> str:
    return f"caffe blob {row.layer}[{row.index}] shape {tuple(blob.shape)}"


def _identical(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit-for-bit equality of two arrays (same shape and dtype, same bytes).

    memcmp on the raw bytes: twice as fast as np.array_equal on a caffemodel's unaligned
    float32 views, and it releases the GIL, so the input hashing thread runs meanwhile.
    """
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
    return _memcmp(a.ctypes.data, b.ctypes.data, a.nbytes) == 0


def _check_tower_copies(net: Net, layer: Layer, head_name: str) -> tuple[int, int]:
    """Compare each tower copy of `layer` with it blob by blob, bit for bit; returns (copies, blobs) checked."""
    copies = blobs = 0
    for copy_name in tower_copy_names(layer.name, head_name):
        if not net.has_layer(copy_name) or not net.layer(copy_name).blobs:
            continue
        copy = net.layer(copy_name)
        if len(copy.blobs) != len(layer.blobs):
            raise CaffeError(
                f"tower copy has {len(copy.blobs)} blobs, '{layer.name}' has {len(layer.blobs)}",
                path=net.path, layer=copy_name,
            )
        for index, (theirs, ours) in enumerate(zip(copy.blobs, layer.blobs)):
            if not _identical(theirs, ours):
                raise CaffeError(
                    f"tower copy blob {index} differs from '{layer.name}'[{index}]; "
                    "the shared towers must hold identical weights",
                    path=net.path, layer=copy_name,
                )
            release_pages(theirs)  # a checked copy is never read again: keep only one tower resident
        copies += 1
        blobs += len(copy.blobs)
    return copies, blobs


def convert_deeplab(
    net: Net,
    *,
    config: ResNetConfig | None = None,
    num_classes: int | None = None,
    head_name: str | None = None,
    progress: bool = False,
) -> ConversionResult:
    """Convert a DeepLab-v2 net read with its blobs into a state dict for DeepLabV2 / DeepLabV2MSC.

    `config` and `head_name` are inferred from the net when not given; `num_classes`, when
    given, must match the head. The BN eps comes from the net definition in use (the
    prototxt when one was read, else the caffemodel's own layers).
    """
    check_unique_names(net, net.definition_path)
    head_name = head_name or detect_head_name((layer.name for layer in net.layers), default=None, path=net.path)
    config = config or infer_config(net)
    rows = name_map(config, head_name)
    head_classes = int(_first_blob(net, head_layer_names(head_name)[0]).shape[0])
    if num_classes is not None and num_classes != head_classes:
        raise CaffeError(
            f"head has {head_classes} classes, expected {num_classes}", path=net.path, layer=head_layer_names(head_name)[0]
        )
    model = _shape_model(config, head_classes)
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    mapped_keys = {row.key for row in rows if row.key is not None}
    if mapped_keys != expected.keys():
        unfilled = sorted(expected.keys() - mapped_keys)
        unknown = sorted(mapped_keys - expected.keys())
        raise CaffeError(f"name map and model disagree: model keys not filled {unfilled}; map keys not in model {unknown}")

    rows_by_layer: dict[str, list[BlobRow]] = defaultdict(list)
    for row in rows:
        rows_by_layer[row.layer].append(row)
    arrays: dict[str, np.ndarray] = {}
    factors: dict[str, np.ndarray] = {}
    copies_checked = blobs_checked = 0
    for layer_name, layer_rows in tqdm(rows_by_layer.items(), desc="layers", unit="layer", disable=not progress):
        if not net.has_layer(layer_name):
            needed = ", ".join(row.key for row in layer_rows if row.key)
            raise CaffeError(f"missing layer: needed for {needed}", path=net.definition_path, layer=layer_name)
        layer = net.layer(layer_name)
        expected_type = LAYER_TYPE_OF_KIND[layer_rows[0].kind]
        if layer.type != expected_type:
            raise CaffeError(f"layer type {layer.type}, expected {expected_type}", path=net.definition_path,
                             layer=layer_name)
        if not layer.blobs:
            raise CaffeError(
                "layer has no weights: the weights file has no layer of this name", path=net.path, layer=layer_name
            )
        if len(layer.blobs) != len(layer_rows):
            used = ", ".join(row.key or "moving-average factor" for row in layer_rows)
            raise CaffeError(
                f"layer has {len(layer.blobs)} blobs, the map uses {len(layer_rows)} ({used})",
                path=net.path, layer=layer_name,
            )
        for row in layer_rows:
            blob = layer.blobs[row.index]
            shape = (1,) if row.key is None else expected[row.key]
            fitted = _fit(blob, shape)
            if fitted is None:
                target = row.key or "the moving-average factor"
                raise CaffeError(f"{_describe(row, blob)} != {target} {shape}", path=net.path, layer=layer_name)
            if row.kind == "bn_factor":
                factors[row.layer] = fitted
            else:
                arrays[row.key] = fitted
            if row.kind in ("conv_weight", "head_weight"):
                _check_conv_geometry(layer, model.get_submodule(row.key.rsplit(".", 1)[0]), row.key,
                                     net.definition_path)
        copies, blobs = _check_tower_copies(net, layer, head_name)
        copies_checked += copies
        blobs_checked += blobs

    for row in rows:
        if row.kind == "bn_mean":
            var_key = row.key.replace(".running_mean", ".running_var")
            arrays[row.key], arrays[var_key] = bn_statistics(arrays[row.key], arrays[var_key], factors[row.layer],
                                                             path=net.path, layer=row.layer)

    used_layers = set(rows_by_layer)
    for name in list(used_layers):
        used_layers.update(tower_copy_names(name, head_name))
    unused = [layer.name for layer in net.layers if layer.blobs and layer.name not in used_layers]
    if unused:
        raise CaffeError(f"layers with weights the DeepLab-v2 map does not use: {listed(unused, 8)}", path=net.path)
    parametric = set(LAYER_TYPE_OF_KIND.values())
    extra = [layer for layer in net.layers if layer.type in parametric and layer.name not in used_layers]
    if extra:  # a layer the model has no place for would be recorded in the manifest's definition, yet not run
        raise CaffeError(f"{extra[0].type} layer that is not part of the DeepLab-v2 net (the map and the model have "
                         "no place for it)", path=net.definition_path, layer=extra[0].name)
    if net.ignored_layers:  # one-to-one: weights the definition cannot place are an error, not a silent drop
        raise CaffeError(
            f"the weights hold layers the net definition lacks: {listed(list(net.ignored_layers), 8)}; "
            "give the prototxt the weights were trained with, or convert the caffemodel alone",
            path=net.path,
        )

    # Zero-copy: the reader's arrays are writable copy-on-write views of the mapped file.
    state_dict = {key: torch.from_numpy(arrays[key]) for key in expected}
    coverage = Coverage(
        layers_read=len(net.layers),
        layers_with_blobs=sum(1 for layer in net.layers if layer.blobs),
        blobs_consumed=len(rows),
        keys_filled=len(state_dict),
        tower_copies_checked=copies_checked,
        tower_blobs_checked=blobs_checked,
    )
    bn_eps = net_bn_eps(net)
    log.info(
        "converted %s: %d blobs -> %d keys, %d tower copies checked, bn eps %g",
        net.path, coverage.blobs_consumed, coverage.keys_filled, copies_checked, bn_eps,
    )
    return ConversionResult(state_dict, config, head_classes, head_name, bn_eps, coverage)
