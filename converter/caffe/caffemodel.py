"""Caffe's binary format: a .caffemodel into the read-only `Net` (layer definitions and blobs).

A caffemodel saved by Caffe holds the full layer definitions, so it is a net on its own. The file
is memory-mapped copy-on-write and blob data become float32 views of the mapping
(converter/caffe/wire.py): no per-element Python work, no copy of the file into Python bytes; the
arrays are writable without touching the file. V1 layers come out upgraded.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from google.protobuf.message import DecodeError

from converter.caffe import wire
from converter.caffe.files import PathLike, input_file, looks_like_hdf5
from converter.caffe.netdesc import Net, assemble_net
from converter.caffe.schema import caffe_pb
from converter.caffe.upgrade import upgrade_v1_layer
from converter.errors import CaffeError

log = logging.getLogger(__name__)


def read_caffemodel(path: PathLike) -> Net:
    """The net in a binary .caffemodel: layer definitions (V1 upgraded) and blobs as float32 arrays.

    Blobs are writable copy-on-write views of the memory-mapped file (pages load on first
    touch; writing to an array never changes the file). Shapes follow Caffe's rule: legacy
    4-D (num, channels, height, width) when the blob has those, else `shape`, else 0-D.
    """
    p = input_file(path)
    if looks_like_hdf5(p):
        raise CaffeError("is an HDF5 weights file, not a binary caffemodel (use load_net or read_hdf5_weights)", path=p)
    try:
        mapped = np.memmap(p, dtype=np.uint8, mode="c")
    except (OSError, ValueError) as exc:
        raise CaffeError(f"cannot map the file: {exc}", path=p) from None
    raw = wire.scan_net(mapped, p)
    if not raw.layers:
        raise CaffeError("holds no layers: not a Caffe net (or a truncated one)", path=p)
    if len({found.version for found in raw.layers}) > 1:
        raise CaffeError("mixes current `layer` and V1 `layers` definitions", path=p)
    pb = caffe_pb()
    header = _parse_binary(pb.NetParameter, raw.header, p, None)
    unknown = [f"net: unknown field {name}" for name in wire.unknown_fields(raw.header, pb.NetParameter.DESCRIPTOR)]
    layers = []
    for found in raw.layers:
        cls = pb.LayerParameter if found.version == 2 else pb.V1LayerParameter
        message = _parse_binary(cls, found.param, p, found.name)
        unknown += [
            f"layer '{found.name}': unknown field {name}" for name in wire.unknown_fields(found.param, cls.DESCRIPTOR)
        ]
        layers.append((message if found.version == 2 else upgrade_v1_layer(message, p), found.blobs))
    log.info("read %s: %d layers, %d blobs", p, len(layers), sum(len(f.blobs) for f in raw.layers))
    return assemble_net(header, layers, p, unknown)


def _parse_binary(cls: Any, data: bytes, path: Path, layer: str | None) -> Any:
    try:
        message = cls.FromString(data)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise CaffeError(f"cannot decode {cls.DESCRIPTOR.name} ({exc})", path=path, layer=layer) from None
    _check_text(message, path, layer)
    return message


def _check_text(message: Any, path: Path, layer: str | None) -> None:
    """Names, types, bottoms and tops must be text: protobuf hands back bytes (or fails) for invalid UTF-8."""
    for field in message.DESCRIPTOR.fields:
        if field.type != field.TYPE_STRING:
            continue
        try:
            values = getattr(message, field.name)
            values = list(values) if not isinstance(values, (str, bytes)) else [values]
        except UnicodeDecodeError:
            values = [b""]
        if any(not isinstance(value, str) for value in values):
            raise CaffeError(f"{message.DESCRIPTOR.name}.{field.name} is not valid UTF-8 text", path=path,
                             layer=layer)
