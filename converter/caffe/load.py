"""The net to convert: structure from a prototxt or caffemodel, blobs from binary or HDF5 weights.

`load_net` chooses the readers (HDF5 or binary by the file's content, or a .h5/.hdf5 name) and
matches blobs to layers by name; `net_definition_text` writes back the definition a conversion ran.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from pathlib import Path

from google.protobuf import text_format

from converter.caffe.caffemodel import read_caffemodel
from converter.caffe.consistency import check_net_against_weights
from converter.caffe.files import HDF5_SUFFIXES, PathLike, input_file, looks_like_hdf5
from converter.caffe.hdf5 import read_hdf5_weights
from converter.caffe.netdesc import Net
from converter.caffe.prototxt import read_prototxt
from converter.caffe.schema import caffe_pb
from converter.errors import CaffeError, listed

log = logging.getLogger(__name__)


def load_net(
    weights: PathLike | None = None, prototxt: PathLike | None = None, defines: Mapping[str, str] | None = None
) -> Net:
    """The net to convert: structure from `prototxt` if given, else from the caffemodel; blobs by layer name.

    `weights` is a binary caffemodel or Caffe HDF5 weights (by content, or a .h5/.hdf5
    name). With both files, each prototxt layer takes the blobs of the weights layer of
    the same name (the last one, when names repeat, as Caffe's CopyTrainedLayersFrom
    leaves it); weights layers the prototxt lacks are ignored, logged and listed in `ignored_layers`. The Net's
    path is the weights file, its `definition` the prototxt; unknown fields are prefixed with their file's name.
    `defines` fills the prototxt's `${NAME}` placeholders (`prototxt.substitute_defines`).
    The definition is checked against the weights as Caffe's loader checks them (converter/caffe/consistency.py).
    """
    if weights is None and prototxt is None:
        raise CaffeError("nothing to load: give a caffemodel (weights) and/or a prototxt")
    if weights is None:
        return read_prototxt(prototxt, defines)  # type: ignore[arg-type]
    weights_path = input_file(weights)
    hdf5 = looks_like_hdf5(weights_path) or weights_path.name.lower().endswith(HDF5_SUFFIXES)
    if prototxt is None:
        if hdf5 and not looks_like_hdf5(weights_path):
            raise CaffeError("is named like HDF5 weights but is not an HDF5 file", path=weights_path)
        if hdf5:
            raise CaffeError("HDF5 weights hold no layer definitions: give the prototxt too", path=weights_path)
        net = read_caffemodel(weights_path)
        check_net_against_weights(net, definition=weights_path, weights=weights_path)
        return net
    structure = read_prototxt(prototxt, defines)
    source = read_hdf5_weights(weights_path) if hdf5 else read_caffemodel(weights_path)
    blobs_by_name = {layer.name: layer.blobs for layer in source.layers if layer.blobs}
    layers = tuple(dataclasses.replace(layer, blobs=blobs_by_name.get(layer.name, ())) for layer in structure.layers)
    ignored = sorted(set(blobs_by_name) - {layer.name for layer in structure.layers})
    if ignored:
        log.info("%s: %d weight layers are not in %s and are ignored: %s", weights_path, len(ignored), prototxt,
                 listed(ignored, 10))
    unknown = tuple(f"{Path(prototxt).name}: {entry}" for entry in structure.unknown_fields)
    unknown += tuple(f"{weights_path.name}: {entry}" for entry in source.unknown_fields)
    net = Net(name=structure.name, path=str(weights_path), inputs=structure.inputs, layers=layers,
              unknown_fields=unknown, ignored_layers=tuple(ignored), definition=str(prototxt))
    check_net_against_weights(net, definition=prototxt, weights=weights_path)
    return net


def net_definition_text(net: Net) -> str:
    """The net's definition as prototxt text (current format, no blobs): what a caffemodel-only conversion ran."""
    pb = caffe_pb()
    param = pb.NetParameter(name=net.name)
    declared = {top for layer in net.layers if layer.type == "Input" for top in layer.tops}
    legacy = {name: dims for name, dims in net.inputs.items() if name not in declared}
    param.input.extend(legacy)
    if all(legacy.values()):
        for dims in legacy.values():
            param.input_shape.add().dim.extend(dims)
    for layer in net.layers:
        param.layer.add().CopyFrom(layer.param)
    return text_format.MessageToString(param)
