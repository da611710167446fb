"""The one check of a net definition against its weights, before anything is converted.

Caffe's own loader (`Net::CopyTrainedLayersFrom`) refuses a weights file whose blob shapes
differ from the ones the net definition implies ("Cannot copy param 0 weights from layer
'conv1'; shape mismatch. Source param shape is ...; target param shape is ..."), and `Net::Init`
refuses a bottom that no earlier layer produces. This module applies the same rules to a Net
read by `load_net`, naming the definition file, the layer and both shapes:
- layer names may repeat, as in Caffe (each layer of a name takes that name's blobs, whose shapes
  are then checked against each layer);
- every bottom is a declared input or a top of an earlier layer;
- Convolution/Deconvolution, InnerProduct, BatchNorm and Scale blobs have the shapes the layer's
  parameters give (num_output, kernel size, group, bias_term; the input channels are not known
  without running shape inference, so a weight's second axis is not checked here).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from converter.caffe.netdesc import Layer, Net
from converter.caffe.params import axis_pair
from converter.errors import CaffeError

PathLike = str | Path
_ALL_PHASES = (0, 1)  # caffe.proto's Phase: TRAIN, TEST


def check_net_against_weights(net: Net, *, definition: PathLike, weights: PathLike) -> None:
    """CaffeError when the definition in `definition` contradicts itself or the blobs read from `weights`."""
    produced = set(net.inputs)
    for layer in net.layers:
        missing = [bottom for bottom in layer.bottoms if bottom not in produced]
        if missing:
            raise CaffeError(f"bottom '{missing[0]}' is not produced by any earlier layer or declared input",
                             path=definition, layer=layer.name)
        produced.update(layer.tops)
        if layer.blobs:
            _check_blob_shapes(layer, definition, weights)


def check_unique_names(net: Net, definition: PathLike) -> None:
    """CaffeError for two layers of one name in the same phase. Caffe allows it (and the layer registry
    builds such nets), but a converter that matches a name map to layers by name cannot tell them apart.

    A train/test prototxt names its two data layers alike, one per phase: that is no duplicate.
    """
    phases_by_name: dict[str, set[int]] = {}
    for layer in net.layers:
        phases = _phases(layer)
        if phases & phases_by_name.get(layer.name, set()):
            raise CaffeError("duplicate layer name in the same phase: the DeepLab map matches layers by name",
                             path=definition, layer=layer.name)
        phases_by_name.setdefault(layer.name, set()).update(phases)


def _phases(layer: Layer) -> set[int]:
    """The phases (TRAIN 0, TEST 1) a layer is part of, by its include/exclude rules on the phase."""
    rules = layer.param
    if any(rule.HasField("phase") for rule in rules.include):
        return {rule.phase for rule in rules.include if rule.HasField("phase")}
    return set(_ALL_PHASES) - {rule.phase for rule in rules.exclude if rule.HasField("phase")}


def _check_blob_shapes(layer: Layer, definition: PathLike, weights: PathLike) -> None:
    expected = _expected_shapes(layer)
    if expected is None:
        return
    if len(layer.blobs) != len(expected):
        raise CaffeError(f"{weights} holds {len(layer.blobs)} blobs, the definition's {layer.type} "
                         f"layer takes {len(expected)}", path=definition, layer=layer.name)
    for index, (blob, want) in enumerate(zip(layer.blobs, expected)):
        have = tuple(int(d) for d in blob.shape)
        if not _matches(have, want):
            shown = tuple(h if w is None else w for h, w in zip(_squeezed(have, len(want)), want))
            raise CaffeError(
                f"cannot copy blob {index} from {weights}: shape mismatch, source {have} "
                f"({math.prod(have)}), target {shown} ({math.prod(shown)})", path=definition, layer=layer.name)


def _expected_shapes(layer: Layer) -> list[tuple[int | None, ...]] | None:
    """The blob shapes the layer's parameters give (None: an axis not known here); None for other types."""
    param = layer.param
    if layer.type in ("Convolution", "Deconvolution"):
        conv = param.convolution_param
        kernel_h, kernel_w = axis_pair(conv, "kernel_size", 0)
        group = max(conv.group, 1)
        if layer.type == "Convolution":
            weight: tuple[int | None, ...] = (conv.num_output, None, kernel_h, kernel_w)
        else:
            weight = (None, conv.num_output // group if conv.num_output % group == 0 else -1, kernel_h, kernel_w)
        return [weight, (conv.num_output,)] if conv.bias_term else [weight]
    if layer.type == "InnerProduct":
        inner = param.inner_product_param
        weight = (None, inner.num_output) if inner.transpose else (inner.num_output, None)
        return [weight, (inner.num_output,)] if inner.bias_term else [weight]
    if layer.type == "BatchNorm":
        channels = int(np.prod(layer.blobs[0].shape)) if layer.blobs else None
        return [(channels,), (channels,), (1,)]
    # A Scale's blobs span bottom axes [axis, axis + num_axes), or take the second bottom's shape:
    # only the one-axis, one-bottom form is known to be 1-D without shape inference.
    if layer.type == "Scale" and len(layer.bottoms) == 1 and param.scale_param.num_axes == 1 and len(layer.blobs) in (1, 2):
        channels = int(np.prod(layer.blobs[0].shape))
        return [(channels,)] * len(layer.blobs)
    return None


def _squeezed(shape: tuple[int, ...], ndim: int) -> tuple[int, ...]:
    """A legacy 4-D blob (1, 1, ..., n) seen with `ndim` axes, as Caffe's ShapeEquals accepts it."""
    if len(shape) > ndim and all(d == 1 for d in shape[: len(shape) - ndim]):
        return shape[len(shape) - ndim :]
    return shape


def _matches(have: tuple[int, ...], want: tuple[int | None, ...]) -> bool:
    squeezed = _squeezed(have, len(want))
    return len(squeezed) == len(want) and all(w is None or h == w for h, w in zip(squeezed, want))

