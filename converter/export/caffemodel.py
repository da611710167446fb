"""A checkpoint folder back to a binary .caffemodel for a given net definition: the reverse of `convert`/`build`.

DeepLab checkpoints (converted or training snapshots) are written through the one name map
(`converter.deeplab.names`), read backwards: BatchNorm statistics with moving-average factor 1
(Caffe divides by the factor, so the stored statistics are the model's own), the multi-scale
towers' shared weights once per tower layer the prototxt has, as the deeplab-v2 fork saves them.
Before the file is moved into place it is converted back (`convert_deeplab` reading the written
bytes); the result must equal the checkpoint's tensors bit for bit (names, dtypes, shapes, bytes),
so a prototxt that does not fit the checkpoint fails here and nothing is written. Registry-built
checkpoints (`python -m converter build`) are written through the registry: the prototxt is built,
the checkpoint loaded into it strictly, and every layer's blobs are read back in Caffe's order.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

from converter.atomic import write_atomic
from converter.caffe.load import load_net, net_definition_text
from converter.caffe.netdesc import Net
from converter.caffe.params import DEFAULT_BN_EPS
from converter.caffe.prototxt import parse_prototxt_text, prototxt_net, read_prototxt, substitute_defines
from converter.caffe.schema import caffe_pb
from converter.caffe.wire import write_caffemodel
from converter.checkpoint import ARCH, MANIFEST_FILE, read_checkpoint
from converter.deeplab.convert import convert_deeplab, net_bn_eps
from converter.deeplab.names import (
    LAYER_TYPE_OF_KIND,
    config_from_state_dict,
    detect_head_name,
    name_map,
    tower_copy_names,
)
from converter.errors import CaffeError, listed
from converter.export.record import checkpoint_folder, sidecar, source_record, write_sidecar
from converter.layers import ARCH as CAFFE_NET_ARCH
from converter.layers import build_net
from converter.loading import load_weights_strictly

log = logging.getLogger(__name__)

BN_FACTOR = np.ones(1, np.float32)  # Caffe divides the stored statistics by it: 1 keeps them as they are
# Caffe types whose layers carry weights in a DeepLab net; each must receive blobs from the checkpoint.
DEEPLAB_WEIGHT_TYPES = frozenset(LAYER_TYPE_OF_KIND.values())

Blobs = dict[str, list[np.ndarray]]


@dataclass(frozen=True)
class CaffeExport:
    """A written caffemodel and its check: layers given blobs, tensors compared after converting it back."""

    path: Path
    sidecar: Path
    layers_written: int
    blobs_written: int
    tensors_compared: int
    bytes_compared: int


def deeplab_caffe_blobs(state_dict: Mapping[str, torch.Tensor], net: Net, manifest: Mapping[str, Any]) -> Blobs:
    """The Caffe blobs of every DeepLab parameter layer `net` defines, from a DeepLab state dict.

    Each name-map row is read backwards; tower copies the net defines get the same arrays.
    A layer of a weight-carrying type that the map does not fill, a missing map layer, a layer
    of the wrong type, a head whose num_output differs or a BatchNorm eps that differs from the
    checkpoint's is an error naming the layer.
    """
    head_name = detect_head_name([layer.name for layer in net.layers], default=None, path=net.path)
    config, num_classes = config_from_state_dict(state_dict)
    bn_eps = float((manifest.get("model") or {}).get("bn_eps", DEFAULT_BN_EPS))
    net_eps = net_bn_eps(net)
    if not np.isclose(net_eps, bn_eps, rtol=1e-6, atol=0.0):
        raise CaffeError(f"BatchNorm eps {net_eps:g} in the prototxt, the checkpoint was made with {bn_eps:g}",
                         path=net.path)
    blobs: Blobs = {}
    for row in name_map(config, head_name):
        if not net.has_layer(row.layer):
            raise CaffeError("the checkpoint has weights for this layer but the prototxt lacks it",
                             path=net.path, layer=row.layer)
        layer = net.layer(row.layer)
        expected = LAYER_TYPE_OF_KIND[row.kind]
        if layer.type != expected:
            raise CaffeError(f"layer type {layer.type}, the checkpoint's weights are for a {expected}",
                             path=net.path, layer=row.layer)
        if row.key is None:
            array = BN_FACTOR
        else:
            if row.key not in state_dict:
                raise CaffeError(f"the checkpoint has no tensor '{row.key}'", path=net.path, layer=row.layer)
            array = state_dict[row.key].detach().cpu().contiguous().numpy()
        blobs.setdefault(row.layer, []).append(array)
    for name in list(blobs):
        layer = net.layer(name)
        if layer.type == "Convolution" and layer.param.convolution_param.num_output != blobs[name][0].shape[0]:
            raise CaffeError(f"num_output {layer.param.convolution_param.num_output}, the checkpoint's weights have "
                             f"{blobs[name][0].shape[0]} outputs", path=net.path, layer=name)
        for copy in tower_copy_names(name, head_name):
            if net.has_layer(copy):
                blobs[copy] = blobs[name]
    unfilled = [layer.name for layer in net.layers if layer.type in DEEPLAB_WEIGHT_TYPES and layer.name not in blobs]
    if unfilled:
        raise CaffeError(f"layers with weights in Caffe that the checkpoint does not fill: {listed(unfilled)}",
                         path=net.path)
    log.info("DeepLab checkpoint (%d classes, blocks %s) -> %d Caffe layers", num_classes, list(config.blocks),
             len(blobs))
    return blobs


def deeplab_round_trip(caffemodel: Path) -> dict[str, torch.Tensor]:
    """The state dict `convert` makes of a written DeepLab caffemodel (its own net definition)."""
    return convert_deeplab(load_net(weights=caffemodel)).state_dict


def registry_caffe_blobs(state_dict: Mapping[str, torch.Tensor], net: Net, manifest: Mapping[str, Any]) -> Blobs:
    """The Caffe blobs of a registry-built checkpoint for `net`: the net is built from the prototxt, the
    checkpoint loaded into it strictly (a misfit names every key), and each layer gives its blobs in Caffe's
    order and shapes (BatchNorm with factor 1; a shared parameter written in every layer that uses it)."""
    model = build_net(net)
    load_weights_strictly(model, state_dict, source=net.path)
    blobs: Blobs = {}
    for info in model.graph.layers:
        arrays = [tensor.detach().cpu().contiguous().numpy() for tensor in model.caffe_blobs(info.name)]
        if arrays:
            blobs[info.name] = arrays
    return blobs


def registry_round_trip(caffemodel: Path) -> dict[str, torch.Tensor]:
    """The state dict the registry builds from a written caffemodel (its own net definition)."""
    return dict(build_net(load_net(weights=caffemodel)).state_dict())


# The manifest's model arch -> (blobs from the state dict, state dict converted back from the written file).
EXPORTERS: dict[str, tuple[Callable[..., Blobs], Callable[[Path], dict[str, torch.Tensor]]]] = {
    ARCH: (deeplab_caffe_blobs, deeplab_round_trip),
    CAFFE_NET_ARCH: (registry_caffe_blobs, registry_round_trip),
}


def compare_state_dicts(
    expected: Mapping[str, torch.Tensor], actual: Mapping[str, torch.Tensor], *, path: str | Path
) -> tuple[int, int]:
    """Both state dicts hold the same keys with identical dtypes, shapes and bytes; returns (tensors, bytes)."""
    missing = sorted(set(expected) - set(actual))
    extra = sorted(set(actual) - set(expected))
    if missing or extra:
        raise CaffeError(f"round trip changes the keys: missing {listed(missing)}; extra {listed(extra)}", path=path)
    compared = 0
    for key, tensor in expected.items():
        other = actual[key]
        if tensor.dtype != other.dtype or tuple(tensor.shape) != tuple(other.shape):
            raise CaffeError(f"round trip changes '{key}': {tensor.dtype} {tuple(tensor.shape)} -> "
                             f"{other.dtype} {tuple(other.shape)}", path=path)
        ours = tensor.detach().cpu().contiguous().view(torch.uint8) if tensor.numel() else tensor
        theirs = other.detach().cpu().contiguous().view(torch.uint8) if other.numel() else other
        if not torch.equal(ours, theirs):
            raise CaffeError(f"round trip changes the bytes of '{key}'", path=path)
        compared += tensor.numel() * tensor.element_size()
    return len(expected), compared


def caffe_net_param(net: Net) -> Any:
    """The NetParameter to write: the prototxt's layers (current format, no blobs), each in phase TEST as saved by Caffe."""
    param = parse_prototxt_text(net_definition_text(net), net.path)
    for layer in param.layer:
        layer.phase = caffe_pb().TEST
    return param


def export_caffemodel(
    checkpoint: str | Path,
    out: str | Path,
    prototxt: str | Path | None = None,
    defines: Mapping[str, str] | None = None,
) -> CaffeExport:
    """Write the checkpoint's weights as a binary caffemodel for `prototxt`, checked by converting it back.

    Without `prototxt`, the net text the checkpoint's manifest records is used; `defines` fill `${NAME}`
    placeholders. The file is written beside `out` under a temporary name, read back and converted; only
    when every tensor is identical to the checkpoint's is it moved to `out`, and the sidecar `<out>.json`.
    """
    out = Path(out)
    state_dict, manifest = read_checkpoint(checkpoint)
    arch = (manifest.get("model") or {}).get("arch")
    if arch not in EXPORTERS:
        raise CaffeError(f"export-caffe knows arch {listed(sorted(EXPORTERS))}, the checkpoint is {arch!r}",
                         path=checkpoint)
    make_blobs, round_trip = EXPORTERS[arch]
    if prototxt is not None:
        net = read_prototxt(prototxt, defines)
    elif manifest.get("prototxt_text"):
        prototxt = checkpoint_folder(checkpoint) / MANIFEST_FILE
        net = prototxt_net(substitute_defines(manifest["prototxt_text"], defines or {}, prototxt), prototxt)
    else:
        raise CaffeError("the manifest records no net definition: give --prototxt", path=checkpoint)
    blobs = make_blobs(state_dict, net, manifest)
    net_param = caffe_net_param(net)
    figures: dict[str, int] = {}

    def write(temporary: Path) -> None:
        write_caffemodel(temporary, net_param, blobs)
        try:
            back = round_trip(temporary)
        except CaffeError as error:  # the written file must convert: name the prototxt, not the temporary
            raise CaffeError(f"the exported weights do not convert back: {error.message}", path=prototxt,
                             layer=error.layer) from None
        figures["tensors"], figures["bytes"] = compare_state_dicts(state_dict, back, path=prototxt)

    if out.is_dir():
        raise CaffeError("is a directory: give the .caffemodel file to write", path=out)
    write_atomic(out, write)
    source = source_record(checkpoint, manifest)
    details = {
        "prototxt": str(Path(prototxt).resolve()),
        "defines": dict(defines or {}),
        "layers_with_blobs": len(blobs),
        "round_trip": {"tensors_identical": figures["tensors"], "bytes_compared": figures["bytes"]},
    }
    try:
        side = write_sidecar(out, sidecar("caffemodel", source, out, details))
    except BaseException:
        out.unlink(missing_ok=True)
        raise
    log.info("exported %s: %d layers, round trip identical (%d tensors)", out, len(blobs), figures["tensors"])
    return CaffeExport(
        path=out,
        sidecar=side,
        layers_written=len(blobs),
        blobs_written=sum(len(arrays) for arrays in blobs.values()),
        tensors_compared=figures["tensors"],
        bytes_compared=figures["bytes"],
    )
