"""Mutations of valid files, at the byte level and at the level of their structure.

Every mutator takes the file's bytes and a seeded `random.Random` and returns new bytes, so a
case is reproduced from (seed, kind, index) alone. Byte mutators know nothing of the format;
structure mutators parse the file (protobuf, prototxt text, HDF5, JSON), change one field,
dataset, attribute or shape to a hostile value, and write it back.
"""

from __future__ import annotations

import io
import json
import random
import struct
from typing import Any, Callable

import h5py
import numpy as np
from google.protobuf import text_format

from converter.caffe.schema import caffe_pb

Mutator = Callable[[bytes, random.Random], bytes]

# Values a hostile or broken file holds: zero, negative, just past int32/uint32/int64, huge.
HOSTILE_INTS = (0, 1, -1, 2, 3, 7, 255, 65536, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40, 2**62, 2**63 - 1)
HOSTILE_FLOATS = (0.0, -0.0, -1.0, 1e-45, 1e-38, 1e38, 3.4e38, float("inf"), float("-inf"), float("nan"), 1e-5)
HOSTILE_TEXT_NUMBERS = ("0", "-1", "2147483648", "4294967296", "9223372036854775808", "1e400", "-1e400", "nan",
                        "inf", "-inf", "1e-45", "0x7fffffff", "99999999999999999999999")
INTERESTING_BYTES = (0x00, 0x01, 0x7F, 0x80, 0xFF, 0x08, 0x0A, 0x12, 0x1B, 0x1C)


# --------------------------------------------------------------------------- bytes


def flip_bits(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        pos = _position(out, rng)
        out[pos] ^= 1 << rng.randrange(8)
    return bytes(out)


def set_bytes(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        out[_position(out, rng)] = rng.choice(INTERESTING_BYTES)
    return bytes(out)


def truncate(data: bytes, rng: random.Random) -> bytes:
    return data[: rng.randrange(len(data))]


def insert_bytes(data: bytes, rng: random.Random) -> bytes:
    pos = rng.randint(0, len(data))
    return data[:pos] + rng.randbytes(rng.randint(1, 64)) + data[pos:]


def delete_range(data: bytes, rng: random.Random) -> bytes:
    start = _position(data, rng)
    return data[:start] + data[start + rng.randint(1, max(1, min(4096, len(data) // 8))) :]


def splice(data: bytes, rng: random.Random) -> bytes:
    """A chunk of the file copied over (or inserted at) another place of the same file."""
    size = rng.randint(1, max(1, min(1024, len(data) // 4)))
    source = rng.randrange(max(1, len(data) - size))
    chunk = data[source : source + size]
    target = _position(data, rng)
    if rng.random() < 0.5:
        return data[:target] + chunk + data[target:]
    return data[:target] + chunk + data[target + len(chunk) :]


def _position(data: bytes | bytearray, rng: random.Random) -> int:
    """A byte position, half the time within the first 4 KiB, where headers and metadata lie."""
    if rng.random() < 0.5:
        return rng.randrange(min(len(data), 4096))
    return rng.randrange(len(data))


BYTE_MUTATORS: dict[str, Mutator] = {
    "flip_bits": flip_bits, "set_bytes": set_bytes, "truncate": truncate, "insert_bytes": insert_bytes,
    "delete_range": delete_range, "splice": splice,
}


# --------------------------------------------------------------------------- protobuf wire


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while pos < len(data) and shift < 70:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
    raise ValueError("bad varint")


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _fields(data: bytes, start: int, end: int) -> list[tuple[int, int, int, int, int]]:
    """(key start, wire type, value start, value end, field number) of well-formed fields in data[start:end]."""
    found, pos = [], start
    try:
        while pos < end:
            key, value_start = _read_varint(data, pos)
            number, wire = key >> 3, key & 7
            if wire == 0:
                _, after = _read_varint(data, value_start)
            elif wire == 2:
                length, value_start = _read_varint(data, value_start)
                after = value_start + length
            elif wire == 1:
                after = value_start + 8
            elif wire == 5:
                after = value_start + 4
            else:
                break
            if after > end:
                break
            found.append((pos, wire, value_start, after, number))
            pos = after
    except ValueError:
        pass
    return found


def wire_field(data: bytes, rng: random.Random) -> bytes:
    """Change one length prefix or varint value of a field found by walking the message tree."""
    start, end = 0, len(data)
    for _ in range(rng.randint(0, 3)):  # descend into a nested message (a layer, a blob, a shape)
        nested = [f for f in _fields(data, start, end) if f[1] == 2 and f[3] > f[2]]
        if not nested:
            break
        _, _, start, end, _ = rng.choice(nested)
    fields = _fields(data, start, end)
    if not fields:
        return flip_bits(data, rng)
    key_start, wire, value_start, value_end, number = rng.choice(fields)
    if wire == 2:
        length = value_end - value_start
        new = rng.choice((0, length - 1, length + 1, length * 2, 2**31, 2**32 + length, 2**63))
        prefix_start = key_start + len(_varint((number << 3) | 2))
        return data[:prefix_start] + _varint(max(new, 0)) + data[value_start:]
    if wire == 0:
        return data[:value_start] + _varint(rng.choice(HOSTILE_INTS)) + data[value_end:]
    if wire == 5:
        return data[:value_start] + struct.pack("<f", rng.choice(HOSTILE_FLOATS)) + data[value_end:]
    return data[:key_start] + _varint((number << 3) | rng.choice((3, 4, 6, 7))) + data[value_start:]


# --------------------------------------------------------------------------- net structure (protobuf objects)


def _random_layer(net: Any, rng: random.Random) -> tuple[Any, bool]:
    """A random layer of a NetParameter (V2 `layer` or V1 `layers`) and whether it is V1."""
    if len(net.layer):
        return net.layer[rng.randrange(len(net.layer))], False
    return net.layers[rng.randrange(len(net.layers))], True


def _mutate_net(net: Any, rng: random.Random) -> str:
    """One hostile change to a NetParameter in place; returns what it did (for the statistics)."""
    layers = net.layer if len(net.layer) else net.layers
    layer, v1 = _random_layer(net, rng)
    other = layers[rng.randrange(len(layers))]
    choice = rng.randrange(16)
    if choice == 0:
        param = layer.convolution_param
        field = rng.choice(("num_output", "kernel_size", "stride", "pad", "dilation", "group", "kernel_h", "stride_w"))
        value = rng.choice(HOSTILE_INTS[:11])
        target = getattr(param, field)
        if isinstance(target, int):
            setattr(param, field, value % 2**32)
        else:
            target.append(value % 2**32)
        return f"convolution_param.{field}"
    if choice == 1:
        layer.batch_norm_param.eps = rng.choice(HOSTILE_FLOATS)
        return "batch_norm_param.eps"
    if choice == 2 and len(layer.blobs):
        blob = layer.blobs[rng.randrange(len(layer.blobs))]
        if rng.random() < 0.5 or v1:
            blob.num, blob.channels = rng.choice(HOSTILE_INTS[:9]) % 2**31, rng.choice((1, 2, 3))
        else:
            dims = list(blob.shape.dim) or [1]
            dims[rng.randrange(len(dims))] = rng.choice(HOSTILE_INTS)
            del blob.shape.dim[:]
            blob.shape.dim.extend(d if d < 2**63 else -1 for d in dims)
        return "blob.shape"
    if choice == 3 and len(layer.blobs):
        blob = layer.blobs[rng.randrange(len(layer.blobs))]
        if len(blob.data):
            blob.data[rng.randrange(len(blob.data))] = rng.choice(HOSTILE_FLOATS)
        return "blob.value"
    if choice == 4 and len(layer.blobs):
        del layer.blobs[rng.randrange(len(layer.blobs))]
        return "blob.removed"
    if choice == 5 and len(layer.blobs):
        layer.blobs.add().CopyFrom(layer.blobs[0])
        return "blob.extra"
    if choice == 6:
        if v1:
            layer.type = rng.choice((0, 1, 4, 14, 39, 41, 1000))
        else:
            layer.type = rng.choice(("Convolution", "Pooling", "BatchNorm", "Scale", "Interp", "Eltwise", "Nope", ""))
        return "layer.type"
    if choice == 7:
        layer.name = other.name
        return "layer.name duplicated"
    if choice == 8:
        layer.bottom.append("dangling_" + str(rng.randrange(100)))
        return "layer.bottom dangling"
    if choice == 9:
        extra = layers.add()
        extra.CopyFrom(other)
        extra.name = other.name + "_extra"
        return "layer extra"
    if choice == 10 and len(layers) > 1:
        del layers[rng.randrange(len(layers))]
        return "layer removed"
    if choice == 11 and not v1:
        param = layer.interp_param
        setattr(param, rng.choice(("height", "width", "zoom_factor", "shrink_factor", "pad_beg", "pad_end")),
                rng.choice((-(2**31), -1, 0, 1, 3, 2**31 - 1)))
        return "interp_param"
    if choice == 12:
        param = layer.pooling_param
        field = rng.choice(("kernel_size", "stride", "pad", "kernel_h", "pool"))
        setattr(param, field, rng.choice((0, 1, 2, 3, 2**31 - 1, 2**32 - 1)) % (3 if field == "pool" else 2**32))
        return f"pooling_param.{field}"
    if choice == 13:
        dims = net.input_shape[0].dim if len(net.input_shape) else net.input_dim
        if len(dims):
            dims[rng.randrange(len(dims))] = rng.choice((0, -1, 2**31, 2**40, 2**62))
        return "input dims"
    if choice == 14 and not v1:
        layer.eltwise_param.coeff.extend([rng.choice(HOSTILE_FLOATS)] * rng.randint(1, 3))
        return "eltwise_param.coeff"
    layer.top.append(layer.top[0] if len(layer.top) else "x")
    return "layer.top duplicated"


def protobuf_structure(data: bytes, rng: random.Random) -> bytes:
    net = caffe_pb().NetParameter()
    try:
        net.ParseFromString(data)
    except Exception:  # a seed always parses; keep the mutator total anyway
        return flip_bits(data, rng)
    if not len(net.layer) and not len(net.layers):
        return flip_bits(data, rng)
    _mutate_net(net, rng)
    return net.SerializeToString()


def protobuf_unknown(data: bytes, rng: random.Random) -> bytes:
    """Unknown fields a file may carry: a group (wire type 3), deep nesting, a huge varint, at a layer."""
    net = caffe_pb().NetParameter()
    net.ParseFromString(data)
    layers = net.layer if len(net.layer) else net.layers
    target = rng.randrange(len(layers))
    number = rng.choice((999, 5000, 2**29 - 1))
    choice = rng.randrange(3)
    if choice == 0:
        inner = _varint((1 << 3) | 0) + b"\x01"
        extra = _varint((number << 3) | 3) + inner + _varint((number << 3) | 4)
    elif choice == 1:
        extra = b""
        for _ in range(rng.choice((10, 100, 1000, 5000))):
            extra = _varint((number << 3) | 2) + _varint(len(extra)) + extra
    else:
        extra = _varint(number << 3) + _varint(rng.choice(HOSTILE_INTS))
    # The net rebuilt by hand, in layer order: protobuf may refuse to parse (so to re-serialize) deep nesting.
    field = 100 if len(net.layer) else 2
    bodies = [m.SerializeToString() + (extra if i == target else b"") for i, m in enumerate(layers)]
    del layers[:]
    header = net.SerializeToString()
    return header + b"".join(_varint((field << 3) | 2) + _varint(len(body)) + body for body in bodies)


# --------------------------------------------------------------------------- prototxt text


def prototxt_structure(data: bytes, rng: random.Random) -> bytes:
    net = caffe_pb().NetParameter()
    text_format.Parse(data.decode("utf-8"), net)
    _mutate_net(net, rng)
    return text_format.MessageToString(net).encode()


def prototxt_text(data: bytes, rng: random.Random) -> bytes:
    """Line and token edits: delete, duplicate or swap lines, hostile numbers, deep nesting, bad bytes."""
    lines = data.decode("utf-8").split("\n")
    choice = rng.randrange(6)
    i = rng.randrange(len(lines))
    if choice == 0:
        del lines[i]
    elif choice == 1:
        lines.insert(i, lines[rng.randrange(len(lines))])
    elif choice == 2:
        j = rng.randrange(len(lines))
        lines[i], lines[j] = lines[j], lines[i]
    elif choice == 3:
        numbered = [k for k, line in enumerate(lines) if any(c.isdigit() for c in line.split(":")[-1])]
        if numbered:
            k = rng.choice(numbered)
            key = lines[k].split(":")[0]
            lines[k] = f"{key}: {rng.choice(HOSTILE_TEXT_NUMBERS)}"
    elif choice == 4:
        depth = rng.choice((50, 500, 5000))
        name = rng.choice(("unknown_thing", "layer", "convolution_param"))
        lines.insert(i, f"{name} {{ " * depth + "}" * depth)
    else:
        return data[:i] + bytes([rng.choice((0x00, 0xC3, 0xFF, 0x7B, 0x7D, 0x22))]) + data[i:]
    return "\n".join(lines).encode()


# --------------------------------------------------------------------------- HDF5


def _edit_hdf5(data: bytes, edit: Callable[[h5py.File], None]) -> bytes:
    stream = io.BytesIO(data)
    with h5py.File(stream, "r+") as h5:
        edit(h5)
    return stream.getvalue()


def _datasets(h5: h5py.File) -> list[str]:
    names: list[str] = []
    h5.visititems(lambda name, item: names.append(name) if isinstance(item, h5py.Dataset) else None)
    return names


def _replace_dataset(h5: h5py.File, name: str, rng: random.Random) -> str:
    """The dataset at `name` replaced by a hostile one: wrong shape, scalar, integer, text, NaN, absurd size."""
    old = h5[name]
    shape, dtype = old.shape, old.dtype
    del h5[name]
    choice = rng.randrange(8)
    if choice == 0:
        h5.create_dataset(name, data=np.zeros(tuple(d + 1 for d in shape) or (2,), np.float32))
        return "dataset wrong shape"
    if choice == 1:
        h5.create_dataset(name, data=np.float32(1.5))
        return "dataset scalar"
    if choice == 2:
        h5.create_dataset(name, data=np.ones(shape, np.int32))
        return "dataset integer"
    if choice == 3:
        h5.create_dataset(name, data="text")
        return "dataset text"
    if choice == 4:
        values = np.ones(shape, dtype if dtype.kind == "f" else np.float32)
        values.reshape(-1)[rng.randrange(max(1, values.size))] = rng.choice((np.nan, np.inf, -np.inf))
        h5.create_dataset(name, data=values)
        return "dataset NaN/inf"
    if choice == 5:
        dims = list(shape) or [1]
        dims[rng.randrange(len(dims))] = rng.choice((2**20, 2**31, 2**40))
        h5.create_dataset(name, shape=tuple(dims), dtype=np.float32, chunks=tuple(1 for _ in dims))
        return "dataset absurd shape"
    if choice == 6:
        h5[name] = h5py.SoftLink("/nowhere/" + name)
        return "dangling soft link"
    h5.create_dataset(name, data=np.ones(shape, np.float64))
    return "dataset float64"


def hdf5_structure(data: bytes, rng: random.Random) -> bytes:
    """One hostile change to an HDF5 file: a dataset replaced or removed, a group or attribute edited."""

    def edit(h5: h5py.File) -> None:
        names = _datasets(h5)
        choice = rng.randrange(7)
        target = rng.choice(names)
        if choice <= 2:
            _replace_dataset(h5, target, rng)
        elif choice == 3:
            del h5[target]
        elif choice == 4:
            group = h5[target].parent
            group.move(target.rsplit("/", 1)[-1], rng.choice(("x", "7", "-1", "0 ")))
        elif choice == 5:
            parent = h5[target].parent.parent
            parent.create_dataset(f"extra{rng.randrange(10)}", data=np.zeros((2, 2), np.float32))
        else:
            obj = rng.choice([h5, h5[target], h5[target].parent])
            keys = list(obj.attrs)
            if keys and rng.random() < 0.5:
                key = rng.choice(keys)
                if rng.random() < 0.5:
                    del obj.attrs[key]
                else:
                    obj.attrs[key] = rng.choice((np.int64(2), np.float64("nan"), "x", np.array(["a", "b"], "S"),
                                                  np.zeros((2, 2)), np.int64(2**62)))
            else:
                obj.attrs["extra"] = np.arange(3)

    return _edit_hdf5(data, edit)


def reference_structure(data: bytes, rng: random.Random) -> bytes:
    """Reference-file changes: a stage's blobs removed, NaN, absurd input dims, the order or metadata edited."""

    def edit(h5: h5py.File) -> None:
        choice = rng.randrange(6)
        blobs = list(h5["blobs"]) if isinstance(h5.get("blobs"), h5py.Group) else []
        if choice == 0 and blobs:
            stage = rng.choice(("res2", "res3", "fc1", "conv1", "pool1"))
            for name in blobs:
                if name.startswith(stage):
                    del h5["blobs"][name]
            order = [n for n in h5["blobs"].attrs.get("order", []) if not str(n).startswith(stage)]
            h5["blobs"].attrs["order"] = np.array(order, dtype=h5py.string_dtype())
        elif choice == 1:
            group = rng.choice([g for g in ("inputs", "blobs") if g in h5] or ["inputs"])
            if group in h5 and len(h5[group]):
                name = f"{group}/{rng.choice(list(h5[group]))}"
                old = np.asarray(h5[name][()], np.float32)
                if old.size:
                    old.reshape(-1)[rng.randrange(old.size)] = rng.choice((np.nan, np.inf))
                del h5[name]
                h5.create_dataset(name, data=old)
        elif choice == 2 and "inputs" in h5 and len(h5["inputs"]):
            name = f"inputs/{rng.choice(list(h5['inputs']))}"
            del h5[name]
            dims = rng.choice(((1, 3, 2**17, 2**17), (2**16, 3, 512, 512), (1, 3, 0, 33), (3, 33, 33), (1,)))
            h5.create_dataset(name, shape=dims, dtype=np.float32, chunks=tuple(1 for _ in dims) if all(dims) else None)
        elif choice == 3 and blobs:
            order = list(h5["blobs"].attrs.get("order", []))
            edits = (lambda o: o[::-1], lambda o: o + ["ghost"], lambda o: o[1:], lambda o: o + o[:1])
            h5["blobs"].attrs["order"] = np.array(rng.choice(edits)(order) or ["x"], dtype=h5py.string_dtype())
        elif choice == 4:
            group = rng.choice([g for g in ("inputs", "blobs") if g in h5] or ["blobs"])
            if group in h5 and len(h5[group]):
                _replace_dataset(h5, f"{group}/{rng.choice(list(h5[group]))}", rng)
        else:
            key = rng.choice(("format", "version", "producer", "prototxt"))
            if rng.random() < 0.3:
                if key in h5.attrs:
                    del h5.attrs[key]
            else:
                h5.attrs[key] = rng.choice((np.int64(1), np.int64(2**62), "caffe-activations", np.float64(1.0),
                                            np.array([1, 2]), b"\xff\xfe"))

    return _edit_hdf5(data, edit)


# --------------------------------------------------------------------------- JSON (manifest)

HOSTILE_JSON = ("x", "", -1, 0, 1, 2**31, 2**70, 1.5, 1e308, None, True, [], [1, 2], {}, {"a": 1}, "NaN")


def json_structure(data: bytes, rng: random.Random) -> bytes:
    """One value of the manifest replaced by a value of another type, removed, or an extra key added."""
    document = json.loads(data)
    paths = _json_paths(document, ())
    focus = [p for p in paths if p and p[0] in ("model", "files", "format", "version", "parity", "surgery", "inputs")]
    path = rng.choice(focus if focus and rng.random() < 0.8 else paths)
    parent = document
    for key in path[:-1]:
        parent = parent[key]
    choice = rng.randrange(4)
    if not path:
        document = rng.choice(HOSTILE_JSON)
    elif choice == 0 and isinstance(parent, dict):
        del parent[path[-1]]
    elif choice == 1 and isinstance(parent, dict):
        parent[f"extra_{rng.randrange(10)}"] = rng.choice(HOSTILE_JSON)
    else:
        parent[path[-1]] = rng.choice(HOSTILE_JSON)
    text = json.dumps(document, indent=1)
    if rng.random() < 0.1:
        text = text.replace("1e+308", "Infinity", 1).replace('"NaN"', "NaN", 1)
    return text.encode()


def _json_paths(node: Any, prefix: tuple[Any, ...]) -> list[tuple[Any, ...]]:
    paths = [prefix]
    if isinstance(node, dict):
        for key, value in node.items():
            if key != "prototxt_text":
                paths += _json_paths(value, prefix + (key,))
    elif isinstance(node, list):
        for index, value in enumerate(node[:8]):
            paths += _json_paths(value, prefix + (index,))
    return paths


def safetensors_structure(data: bytes, rng: random.Random) -> bytes:
    """The safetensors header (8-byte length + JSON) edited: a tensor's shape, dtype or offsets changed."""
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    name = rng.choice([k for k in header if k != "__metadata__"])
    entry = header[name]
    field = rng.choice(("shape", "dtype", "data_offsets", "length"))
    if field == "shape":
        entry["shape"] = rng.choice(([], [2**40], [-1], [0], entry["shape"] + [1], [2**31, 2**31]))
    elif field == "dtype":
        entry["dtype"] = rng.choice(("I64", "U8", "F64", "BOOL", "XYZ", "F16"))
    elif field == "data_offsets":
        start, end = entry["data_offsets"]
        entry["data_offsets"] = rng.choice(([end, start], [start, end + 4], [0, 2**62], [start, start]))
    else:
        return struct.pack("<Q", rng.choice((0, length + 1, 2**40, 2**63))) + data[8:]
    body = json.dumps(header).encode()
    return struct.pack("<Q", len(body)) + body + data[8 + length :]
