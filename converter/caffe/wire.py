"""Caffe's binary formats at the byte level: blob decoding without per-element work, streaming writers.

Reading: `scan_net` walks the top-level NetParameter fields of a buffer (normally a
copy-on-write memory map of the caffemodel). Each layer's non-blob fields are copied out
for protobuf to parse (they are small); each BlobProto is decoded here, its float data
becoming an `np.frombuffer` view of the buffer, so a 530 MB file is neither copied into
Python bytes nor expanded into protobuf's per-element containers.

Writing: `write_caffemodel` streams a NetParameter layer by layer in the byte layout Caffe
itself produces, to a temporary file beside the target renamed into place, so a failure leaves
nothing there. (Caffe's HDF5 weights are read and written in converter/caffe/hdf5.py.)
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from converter.atomic import write_atomic
from converter.errors import CaffeError

__all__ = [
    "RawLayer",
    "RawNet",
    "decode_blob",
    "scan_net",
    "unknown_fields",
    "write_caffemodel",
]

log = logging.getLogger(__name__)

VARINT, FIXED64, LENGTH, FIXED32 = 0, 1, 2, 5

NET_LAYER = 100  # NetParameter.layer (LayerParameter)
NET_V1_LAYERS = 2  # NetParameter.layers (V1LayerParameter)
# Per layer version: field numbers of name, blobs.
_LAYER_NAME = {1: 4, 2: 1}
_LAYER_BLOBS = {1: 6, 2: 7}
_LAYER_TYPE = 2  # LayerParameter.type (a string; V1 types are enums, upgraded elsewhere)

# BlobProto fields.
_BLOB_LEGACY = (1, 2, 3, 4)  # num, channels, height, width
_BLOB_DATA, _BLOB_SHAPE, _BLOB_DOUBLE_DATA = 5, 7, 8

# BVLC field numbers the DeepLab fork reuses (see caffe.proto): on disk -> in our schema, by layer type.
_BVLC_ALIASES = {"Input": (143, 10143), "Crop": (144, 10144)}
_BVLC_ALIAS_NUMBERS = frozenset(on_disk for on_disk, _ in _BVLC_ALIASES.values())


class _Malformed(ValueError):
    """Bytes that are not a well-formed protobuf message (caught and reported with the file)."""


@dataclass(frozen=True)
class RawLayer:
    """One layer as found on disk: version 1 (V1LayerParameter) or 2, its serialized non-blob fields, its blobs."""

    version: int
    name: str
    param: bytes
    blobs: tuple[np.ndarray, ...]


@dataclass(frozen=True)
class RawNet:
    """A NetParameter split into its non-layer fields (serialized) and its layers, in file order."""

    header: bytes
    layers: tuple[RawLayer, ...]


def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end:
            raise _Malformed("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise _Malformed("varint longer than 10 bytes")


def _next_field(buf: memoryview, pos: int, end: int) -> tuple[int, int, int, int]:
    """(field number, wire type, value start, next field start) of the field at `pos`."""
    if pos < end and buf[pos] < 0x80:  # one-byte key (fields 1..15): skip the general varint loop
        key = buf[pos]
        pos += 1
    else:
        key, pos = _varint(buf, pos, end)
    number, wire = key >> 3, key & 7
    if number == 0:
        raise _Malformed("field number 0")
    if wire == VARINT:
        _, after = _varint(buf, pos, end)
    elif wire == LENGTH:
        length, pos = _varint(buf, pos, end)
        after = pos + length
    elif wire == FIXED64:
        after = pos + 8
    elif wire == FIXED32:
        after = pos + 4
    else:
        raise _Malformed(f"unsupported wire type {wire} (field {number})")
    if after > end:
        raise _Malformed(f"field {number} runs past the end of its message (truncated file?)")
    return number, wire, pos, after


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    value &= (1 << 64) - 1
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _key(number: int, wire: int) -> bytes:
    return _encode_varint(number << 3 | wire)


def _signed64(value: int) -> int:
    """A varint read as a signed 64-bit value (int32 negatives are sign-extended on the wire)."""
    return value - (1 << 64) if value >= 1 << 63 else value


# --------------------------------------------------------------------------- reading


def scan_net(buffer: Any, path: str | os.PathLike[str]) -> RawNet:
    """Split a serialized NetParameter (bytes, or a uint8 array such as a np.memmap) into header and layers.

    Blob arrays are views of `buffer` where the data is packed float32 (the normal case);
    malformed bytes raise CaffeError naming `path` and, when known, the layer.
    """
    view = memoryview(buffer)
    if view.format != "B":
        view = view.cast("B")
    header: list[bytes] = []
    layers: list[RawLayer] = []
    pos, end = 0, len(view)
    while pos < end:
        try:
            number, wire, start, after = _next_field(view, pos, end)
        except _Malformed as exc:
            name = _name_of_partial_layer(view, pos, end)
            raise CaffeError(
                f"not a valid caffemodel at byte {pos} ({exc})", path=path, layer=name
            ) from None
        if wire == LENGTH and number in (NET_LAYER, NET_V1_LAYERS):
            version = 2 if number == NET_LAYER else 1
            layers.append(_scan_layer(view, buffer, start, after, version, path, len(layers)))
        else:
            header.append(bytes(view[pos:after]))
        pos = after
    return RawNet(header=b"".join(header), layers=tuple(layers))


def _name_of_partial_layer(view: memoryview, pos: int, end: int) -> str | None:
    """Best effort: the name of a layer whose bytes run past the end of the file (for the error message)."""
    try:
        key, start = _varint(view, pos, end)
        number = key >> 3
        if key & 7 != LENGTH or number not in (NET_LAYER, NET_V1_LAYERS):
            return None
        _, start = _varint(view, start, end)
        name_field = _LAYER_NAME[2 if number == NET_LAYER else 1]
        while start < end:
            field, wire, value, after = _next_field(view, start, end)
            if field == name_field and wire == LENGTH:
                return bytes(view[value:after]).decode("utf-8", "replace")
            start = after
    except _Malformed:
        pass
    return None


def _scan_layer(
    view: memoryview, buffer: Any, start: int, end: int, version: int, path: Any, index: int
) -> RawLayer:
    """Split one layer into its non-blob fields (BVLC aliases renumbered) and its decoded blobs."""
    name_field, blob_field = _LAYER_NAME[version], _LAYER_BLOBS[version]
    blob_spans: list[tuple[int, int, int]] = []  # (key start, value start, end) of each blob field
    alias_spans: list[tuple[int, int, int, int]] = []  # (number, key start, value start, end) of possible aliases
    name, layer_type = f"#{index}", ""
    pos = start
    try:
        while pos < end:
            number, wire, value, after = _next_field(view, pos, end)
            if wire == LENGTH:
                if number == blob_field:
                    blob_spans.append((pos, value, after))
                elif number == name_field:
                    name = bytes(view[value:after]).decode("utf-8", "replace")
                elif version == 2 and number == _LAYER_TYPE:
                    layer_type = bytes(view[value:after]).decode("utf-8", "replace")
                elif version == 2 and number in _BVLC_ALIAS_NUMBERS:
                    alias_spans.append((number, pos, value, after))
            pos = after
    except _Malformed as exc:
        raise CaffeError(f"malformed layer definition at byte {pos} ({exc})", path=path, layer=name) from None
    # The param is the layer's bytes with the blob fields cut out and the alias fields' keys renumbered.
    edits = [(key_start, after, b"") for key_start, _, after in blob_spans]
    alias = _BVLC_ALIASES.get(layer_type) if version == 2 else None
    if alias is not None:
        edits += [
            (key_start, value, _key(alias[1], LENGTH) + _encode_varint(after - value))
            for number, key_start, value, after in alias_spans
            if number == alias[0]
        ]
    parts, cursor = [], start
    for cut_start, cut_end, replacement in sorted(edits):
        parts += (bytes(view[cursor:cut_start]), replacement)
        cursor = cut_end
    parts.append(bytes(view[cursor:end]))
    blobs = tuple(
        decode_blob(view, buffer, value, after, path=path, layer=name, index=i)
        for i, (_, value, after) in enumerate(blob_spans)
    )
    return RawLayer(version=version, name=name, param=b"".join(parts), blobs=blobs)


def decode_blob(
    view: memoryview, buffer: Any, start: int, end: int, *, path: Any, layer: str, index: int
) -> np.ndarray:
    """The float32 array of the BlobProto in `view[start:end]`, shaped by Caffe's rule (Blob::FromProto).

    Shape: legacy (num, channels, height, width) when any of them is present, else `shape.dim`
    (none at all means a 0-D blob of one value). `double_data`, when present, wins and is
    converted to float32. Packed float data is a zero-copy view of `buffer`.
    """
    legacy: dict[int, int] = {}
    dims: list[int] | None = None
    floats: list[np.ndarray] = []
    doubles: list[np.ndarray] = []
    pos = start
    try:
        while pos < end:
            number, wire, value, after = _next_field(view, pos, end)
            if number in _BLOB_LEGACY and wire == VARINT:
                legacy[number] = _signed64(_varint(view, value, after)[0])
            elif number == _BLOB_SHAPE and wire == LENGTH:
                dims = (dims or []) + _shape_dims(view, value, after)
            elif number == _BLOB_DATA and wire == LENGTH:
                floats.append(_packed(buffer, value, after, "<f4"))
            elif number == _BLOB_DATA and wire == FIXED32:
                values, after = _unpacked_run(buffer, pos, end, _key(_BLOB_DATA, FIXED32)[0], "<f4")
                floats.append(values)
            elif number == _BLOB_DOUBLE_DATA and wire == LENGTH:
                doubles.append(_packed(buffer, value, after, "<f8"))
            elif number == _BLOB_DOUBLE_DATA and wire == FIXED64:
                values, after = _unpacked_run(buffer, pos, end, _key(_BLOB_DOUBLE_DATA, FIXED64)[0], "<f8")
                doubles.append(values)
            pos = after  # diff, double_diff and unknown fields are skipped
    except _Malformed as exc:
        raise CaffeError(f"blob {index}: malformed BlobProto ({exc})", path=path, layer=layer) from None
    if legacy:
        shape = tuple(legacy.get(number, 0) for number in _BLOB_LEGACY)
    else:
        shape = tuple(dims or ())
    if doubles:
        data = np.concatenate(doubles).astype(np.float32)
    elif len(floats) == 1:
        data = floats[0]
    else:
        data = np.concatenate(floats) if floats else np.empty(0, "<f4")
    expected = math.prod(shape)  # Python ints: no numpy call per blob, no int64 overflow on absurd dims
    if any(d < 0 for d in shape) or expected != data.size:
        raise CaffeError(
            f"blob {index} holds {data.size} values but its shape {list(shape)} needs {expected}",
            path=path,
            layer=layer,
        )
    return data.reshape(shape)


def _shape_dims(view: memoryview, start: int, end: int) -> list[int]:
    """BlobShape.dim, packed or not (a handful of varints)."""
    dims: list[int] = []
    pos = start
    while pos < end:
        number, wire, value, after = _next_field(view, pos, end)
        if number == 1 and wire == LENGTH:
            while value < after:
                dim, value = _varint(view, value, after)
                dims.append(_signed64(dim))
        elif number == 1 and wire == VARINT:
            dims.append(_signed64(_varint(view, value, after)[0]))
        pos = after
    return dims


def _packed(buffer: Any, start: int, end: int, dtype: str) -> np.ndarray:
    size = np.dtype(dtype).itemsize
    if (end - start) % size:
        raise _Malformed(f"packed {dtype} data of {end - start} bytes")
    return np.frombuffer(buffer, dtype=dtype, count=(end - start) // size, offset=start)


def _unpacked_run(buffer: Any, pos: int, end: int, key: int, dtype: str) -> tuple[np.ndarray, int]:
    """Decode a run of unpacked fixed-width values (key byte + value, repeated) in one vectorised step."""
    record = 1 + np.dtype(dtype).itemsize
    count = (end - pos) // record
    table = np.frombuffer(buffer, dtype=np.uint8, count=count * record, offset=pos).reshape(count, record)
    breaks = np.flatnonzero(table[:, 0] != key)
    run = count if breaks.size == 0 else int(breaks[0])
    values = np.ascontiguousarray(table[:run, 1:]).view(dtype).reshape(-1)
    return values, pos + run * record


@functools.cache
def _field_table(descriptor: Any) -> dict[int, tuple[str, frozenset[int], Any]]:
    """number -> (name, accepted wire types, message descriptor or None) of a message's fields.

    Built once per schema message: the unknown-field walk visits ~16k fields per DeepLab net.
    """
    return {field.number: (field.name, _expected_wire(field), field.message_type) for field in descriptor.fields}


def _expected_wire(field: Any) -> frozenset[int]:
    if field.message_type is not None or field.type in (field.TYPE_STRING, field.TYPE_BYTES):
        return frozenset({LENGTH})
    if field.type in (field.TYPE_DOUBLE, field.TYPE_FIXED64, field.TYPE_SFIXED64):
        wire = FIXED64
    elif field.type in (field.TYPE_FLOAT, field.TYPE_FIXED32, field.TYPE_SFIXED32):
        wire = FIXED32
    else:
        wire = VARINT
    return frozenset({wire, LENGTH} if _is_repeated(field) else {wire})


def _is_repeated(field: Any) -> bool:
    """FieldDescriptor.is_repeated (protobuf >= 6) or the older `label`."""
    flag = getattr(field, "is_repeated", None)
    if flag is None:
        return field.label == field.LABEL_REPEATED
    return bool(flag() if callable(flag) else flag)


def unknown_fields(data: bytes, descriptor: Any) -> list[str]:
    """Dotted paths of the fields in serialized `data` that `descriptor`'s schema does not know.

    A number the message lacks is reported as the number ("convolution_param.99"); a known
    field with the wrong wire type (which protobuf also keeps as unknown) by name and wire type.
    """
    found: list[str] = []
    view = memoryview(data)
    _collect_unknown(view, 0, len(view), descriptor, "", found)
    return found


def _collect_unknown(view: memoryview, pos: int, end: int, descriptor: Any, prefix: str, found: list[str]) -> None:
    fields = _field_table(descriptor)
    while pos < end:
        number, wire, value, after = _next_field(view, pos, end)
        known = fields.get(number)
        if known is None:
            found.append(f"{prefix}{number}")
        else:
            name, wires, message_type = known
            if wire not in wires:
                found.append(f"{prefix}{name} (wire type {wire})")
            elif message_type is not None:
                _collect_unknown(view, value, after, message_type, f"{prefix}{name}.", found)
        pos = after


# --------------------------------------------------------------------------- writing


def write_caffemodel(
    path: str | os.PathLike[str], net_param: Any, blobs: Mapping[str, Sequence[np.ndarray]]
) -> None:
    """Write a binary caffemodel as Caffe does: each layer of `net_param` (no blobs) with blobs[layer.name].

    Blobs become BlobProtos with `shape` and packed little-endian float32 `data`, placed where
    Caffe serializes them (field 7, between `param` and `include`). The file is streamed layer
    by layer to a temporary file beside `path`, then renamed over it: no message the size of
    the model is built, and a failure leaves nothing at `path`.
    """
    if len(net_param.layers):
        raise ValueError("write_caffemodel writes current-format nets: move V1 `layers` to `layer` first")
    names = {layer.name for layer in net_param.layer}
    missing = sorted(set(blobs) - names)
    if missing:
        raise ValueError(f"blobs given for layers the net does not have: {missing[:5]}")
    header = type(net_param)()
    header.CopyFrom(net_param)
    header.ClearField("layer")

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as stream:
            stream.write(header.SerializeToString())
            for layer in net_param.layer:
                if len(layer.blobs):
                    raise ValueError(f"layer '{layer.name}' carries blobs in net_param; pass them in `blobs`")
                _write_layer(stream, layer, blobs.get(layer.name, ()))

    write_atomic(path, write)
    log.info("wrote %s (%d layers, %d with blobs)", path, len(net_param.layer), len(blobs))


def _write_layer(stream: IO[bytes], layer: Any, arrays: Sequence[np.ndarray]) -> None:
    serialized = memoryview(layer.SerializeToString())
    alias = _BVLC_ALIASES.get(layer.type)
    head, tail = [], []
    pos, end = 0, len(serialized)
    while pos < end:
        number, wire, value, after = _next_field(serialized, pos, end)
        if alias is not None and number == alias[1] and wire == LENGTH:
            chunk = _key(alias[0], LENGTH) + _encode_varint(after - value) + bytes(serialized[value:after])
        else:
            chunk = bytes(serialized[pos:after])
        (head if number < _LAYER_BLOBS[2] else tail).append(chunk)
        pos = after
    encoded = [_blob_parts(np.asarray(array)) for array in arrays]
    blob_entries = [
        (_key(_LAYER_BLOBS[2], LENGTH) + _encode_varint(len(prefix) + data.nbytes + len(suffix)), prefix, data, suffix)
        for prefix, data, suffix in encoded
    ]
    size = sum(map(len, head)) + sum(map(len, tail))
    size += sum(len(key) + len(prefix) + data.nbytes + len(suffix) for key, prefix, data, suffix in blob_entries)
    stream.write(_key(NET_LAYER, LENGTH) + _encode_varint(size))
    stream.writelines(head)
    for key, prefix, data, suffix in blob_entries:
        stream.write(key + prefix)
        stream.write(memoryview(data).cast("B"))
        stream.write(suffix)
    stream.writelines(tail)


def _blob_parts(array: np.ndarray) -> tuple[bytes, np.ndarray, bytes]:
    """(bytes before the data, the contiguous '<f4' data, bytes after) of one BlobProto, in Caffe's field order.

    Like Caffe's Blob::ToProto, a 0-D blob gets no `shape` and an empty blob no `data`.
    """
    data = np.ascontiguousarray(array, dtype="<f4").reshape(-1)
    prefix = _key(_BLOB_DATA, LENGTH) + _encode_varint(data.nbytes) if data.size else b""
    suffix = b""
    if array.ndim:
        dims = b"".join(_encode_varint(int(d)) for d in array.shape)
        shape = _key(1, LENGTH) + _encode_varint(len(dims)) + dims
        suffix = _key(_BLOB_SHAPE, LENGTH) + _encode_varint(len(shape)) + shape
    return prefix, data, suffix
