"""Read Caffe nets into the read-only `Net` description: .prototxt, .caffemodel and .caffemodel.h5.

- `read_prototxt` / `parse_prototxt_text`: the text format (syntax errors name file and line).
- `read_caffemodel`: the binary format. A caffemodel saved by Caffe holds the full layer
  definitions, so it is a net on its own. The file is memory-mapped copy-on-write and blob
  data become float32 views of the mapping (converter/wire.py): no per-element Python work,
  no copy of the file into Python bytes; the arrays are writable without touching the file.
- `read_hdf5_weights` / `iter_hdf5_weights`: Caffe's HDF5 weights (`/data/<layer>/<i>`).
- `load_net`: structure from the prototxt when given, else from the caffemodel; blobs matched
  by layer name; HDF5 or binary chosen by the file's content (or a .h5/.hdf5 extension).

V1 nets (`layers`, enum types) come out as current layers (converter/upgrade.py). Fields the
schema does not know are tolerated and listed in `Net.unknown_fields`. Every bad input raises
CaffeError: one line naming the file and, where known, the layer.
"""

from __future__ import annotations

import dataclasses
import logging
import mmap
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from google.protobuf import text_format
from google.protobuf.message import DecodeError

from converter import wire
from converter.errors import CaffeError, listed
from converter.netdesc import Layer, Net
from converter.schema import caffe_pb
from converter.upgrade import upgrade_v1_layer

__all__ = [
    "iter_hdf5_weights",
    "load_net",
    "net_definition_text",
    "parse_prototxt_text",
    "read_caffemodel",
    "read_hdf5_weights",
    "read_prototxt",
    "release_pages",
]

log = logging.getLogger(__name__)

HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_HDF5_SUFFIXES = (".h5", ".hdf5")
_FINITE_CHUNK = 1 << 22  # elements per vectorised NaN/inf check (bounds the temporary mask)

PathLike = str | os.PathLike[str]


# --------------------------------------------------------------------------- files


def _input_file(path: PathLike) -> Path:
    """`path` as a Path when it names a readable, non-empty regular file; CaffeError otherwise."""
    p = Path(path)
    if not p.exists():
        raise CaffeError("no such file", path=p)
    if p.is_dir():
        raise CaffeError("is a directory, not a file", path=p)
    try:
        size = p.stat().st_size
        with open(p, "rb"):
            pass
    except OSError as exc:
        raise CaffeError(f"cannot read: {exc.strerror or exc}", path=p) from None
    if size == 0:
        raise CaffeError("empty file", path=p)
    return p


def _looks_like_hdf5(path: Path) -> bool:
    with open(path, "rb") as stream:
        return stream.read(len(HDF5_MAGIC)) == HDF5_MAGIC


# --------------------------------------------------------------------------- text


def parse_prototxt_text(text: str, path: PathLike = "<text>") -> Any:
    """Parse prototxt text into a NetParameter; CaffeError "<path>: line N: ..." on a syntax error.

    Unknown fields are skipped (and logged); `read_prototxt` also lists them in the Net.
    """
    param, unknown = _parse_text(text, path)
    for entry in unknown:
        log.warning("%s: %s", path, entry)
    return param


def read_prototxt(path: PathLike) -> Net:
    """The net defined by a .prototxt file (V1 text upgraded); its layers have no blobs unless the text holds some."""
    p = _input_file(path)
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CaffeError(f"not a text prototxt (not UTF-8 at byte {exc.start})", path=p) from None
    param, unknown = _parse_text(text, p)
    if len(param.layer) and len(param.layers):
        raise CaffeError("mixes current `layer` and V1 `layers` definitions", path=p)
    if not len(param.layer) and not len(param.layers):
        raise CaffeError("defines no layers: not a net prototxt (a solver?)", path=p)
    layers: list[tuple[Any, tuple[np.ndarray, ...]]] = []
    for version, layer in [(2, layer) for layer in param.layer] + [(1, layer) for layer in param.layers]:
        blobs = tuple(_decode_text_blob(blob, p, layer.name, i) for i, blob in enumerate(layer.blobs))
        layer.ClearField("blobs")
        layers.append((layer if version == 2 else upgrade_v1_layer(layer, p), blobs))
    return _assemble(param, layers, p, unknown)


def _decode_text_blob(blob: Any, path: Path, layer: str, index: int) -> np.ndarray:
    """A blob written inline in text goes through the same decoder as binary ones (one shape rule)."""
    data = blob.SerializeToString()
    return wire.decode_blob(memoryview(data), data, 0, len(data), path=path, layer=layer, index=index).copy()


def _parse_text(text: str, path: PathLike) -> tuple[Any, list[str]]:
    """Strict parse; when only unknown fields stop it, a tolerant parse plus the list of what was skipped."""
    pb = caffe_pb()
    param = pb.NetParameter()
    try:
        text_format.Parse(text, param)
        return param, []
    except text_format.ParseError as strict_error:
        param = pb.NetParameter()
        try:
            text_format.Parse(text, param, allow_unknown_field=True)
        except text_format.ParseError:
            raise _syntax_error(strict_error, path) from None
    walker = _TextFieldWalker(text)
    walker.message(0, param.DESCRIPTOR, "", None)
    unknown = []
    for owner, name, line in walker.found:
        where = "net" if owner is None else f"layer '{getattr(param, owner[0])[owner[1]].name}'"
        unknown.append(f"{where}: unknown field {name} (line {line})")
    return param, unknown


def _syntax_error(error: text_format.ParseError, path: PathLike) -> CaffeError:
    message = re.sub(r"^\d+(:\d+)? : ", "", str(error))
    line = error.GetLine()
    return CaffeError(message if line is None else f"line {line}: {message}", path=path)


_TEXT_TOKEN = re.compile(
    r"""(?P<skip>\s+|\#[^\n]*)
      | (?P<string>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')
      | (?P<symbol>[{}\[\]<>:;,])
      | (?P<word>[^\s{}\[\]<>:;,"'\#]+)""",
    re.VERBOSE,
)


class _TextFieldWalker:
    """Finds the field names a text-format NetParameter uses that the schema lacks, with their lines.

    Runs only after text_format accepted the text with allow_unknown_field=True (so the text is
    well formed); text_format itself skips unknown fields without saying which.
    """

    def __init__(self, text: str) -> None:
        self.tokens: list[tuple[str, str, int]] = []
        line = 1
        for match in _TEXT_TOKEN.finditer(text):
            if match.lastgroup != "skip":
                self.tokens.append((match.lastgroup, match.group(), line))
            line += match.group().count("\n")
        self.found: list[tuple[tuple[str, int] | None, str, int]] = []
        self.layer_counts = {"layer": 0, "layers": 0}

    def message(self, pos: int, descriptor: Any, prefix: str, owner: tuple[str, int] | None) -> int:
        """Walk fields from `pos` to the closing brace; returns the position after it."""
        while pos < len(self.tokens):
            _, token, line = self.tokens[pos]
            if token in ("}", ">"):
                return pos + 1
            pos += 1
            if token in (",", ";"):
                continue
            field = None if descriptor is None else descriptor.fields_by_name.get(token)
            if descriptor is not None and field is None:
                self.found.append((owner, prefix + token, line))
            if pos < len(self.tokens) and self.tokens[pos][1] == ":":
                pos += 1
            is_layer = owner is None and field is not None and field.name in self.layer_counts
            sub = None if field is None else field.message_type
            pos = self.value(pos, sub, f"{prefix}{token}.", owner, field.name if is_layer else None)
        return pos

    def value(self, pos: int, descriptor: Any, prefix: str, owner: Any, layer_field: str | None) -> int:
        _, token, _ = self.tokens[pos]
        if token in ("{", "<"):
            if layer_field is not None:
                owner, prefix = (layer_field, self.layer_counts[layer_field]), ""
                self.layer_counts[layer_field] += 1
            return self.message(pos + 1, descriptor, prefix, owner)
        if token == "[":
            pos += 1
            while pos < len(self.tokens) and self.tokens[pos][1] != "]":
                pos = pos + 1 if self.tokens[pos][1] == "," else self.value(pos, descriptor, prefix, owner, layer_field)
            return pos + 1
        pos += 1
        while pos < len(self.tokens) and self.tokens[pos][0] == "string" and self.tokens[pos - 1][0] == "string":
            pos += 1  # adjacent string literals concatenate
        return pos


# --------------------------------------------------------------------------- binary


def read_caffemodel(path: PathLike) -> Net:
    """The net in a binary .caffemodel: layer definitions (V1 upgraded) and blobs as float32 arrays.

    Blobs are writable copy-on-write views of the memory-mapped file (pages load on first
    touch; writing to an array never changes the file). Shapes follow Caffe's rule: legacy
    4-D (num, channels, height, width) when the blob has those, else `shape`, else 0-D.
    """
    p = _input_file(path)
    if _looks_like_hdf5(p):
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
    return _assemble(header, layers, p, unknown)


def _parse_binary(cls: Any, data: bytes, path: Path, layer: str | None) -> Any:
    try:
        return cls.FromString(data)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise CaffeError(f"cannot decode {cls.DESCRIPTOR.name} ({exc})", path=path, layer=layer) from None


# --------------------------------------------------------------------------- HDF5


def iter_hdf5_weights(path: PathLike) -> Iterator[tuple[str, tuple[np.ndarray, ...]]]:
    """Stream Caffe HDF5 weights: (layer name, blobs) per `/data/<layer>` group, in the file's order.

    Memory stays bounded by what the caller keeps: a dataset stored contiguously (as Caffe
    writes them) becomes a float32 copy-on-write memory map of its own bytes, loaded on first
    touch and unmapped when the caller drops it; other layouts (chunked, compressed, float64,
    big-endian) are read one dataset at a time. The layout is checked before anything is
    yielded; NaN/inf is checked blob by blob through a temporary mapping, so yielded arrays
    are untouched. Caffe's Net::ToHDF5 skips parameters a layer shares with an earlier one,
    so such layers come out with no blobs.
    """
    p = _input_file(path)
    try:
        h5 = h5py.File(p, "r")
    except OSError as exc:
        raise CaffeError(f"not an HDF5 file ({exc})", path=p) from None
    with h5:
        layout = _hdf5_layout(h5, p)
        for name, datasets in layout:
            blobs = tuple(_hdf5_blob(p, name, index, dataset) for index, dataset in enumerate(datasets))
            yield name, blobs


def read_hdf5_weights(path: PathLike) -> Net:
    """Caffe HDF5 weights as a Net of blob-only layers (type ""; no definitions are stored in the file).

    Built on `iter_hdf5_weights`, so blobs are lazily mapped: reading costs metadata plus one
    pass for the NaN/inf check, and resident memory grows only with what consumers touch.
    A converter that must stream a file larger than memory iterates `iter_hdf5_weights`.
    """
    pb = caffe_pb()
    layers = tuple(
        Layer(name=name, type="", bottoms=(), tops=(), param=pb.LayerParameter(name=name), blobs=blobs)
        for name, blobs in iter_hdf5_weights(path)
    )
    return Net(name="", path=str(path), inputs={}, layers=layers)


def _hdf5_layout(h5: Any, path: Path) -> list[tuple[str, list[Any]]]:
    """[(layer name, datasets in blob order)] after checking the `/data/<layer>/<i>` layout."""
    data = h5.get("data")
    if not isinstance(data, h5py.Group):
        raise CaffeError("not Caffe HDF5 weights: no /data group", path=path)
    layout = []
    for name, group in data.items():
        if not isinstance(group, h5py.Group):
            raise CaffeError("not Caffe HDF5 weights: /data holds a dataset, not a layer group", path=path, layer=name)
        keys = sorted(group.keys(), key=lambda k: int(k) if k.isdigit() else -1)
        if keys != [str(i) for i in range(len(keys))]:
            raise CaffeError(f"blob datasets must be named 0..n-1, found {sorted(group.keys())}", path=path, layer=name)
        datasets = [group[key] for key in keys]
        for index, dataset in enumerate(datasets):
            if not isinstance(dataset, h5py.Dataset) or dataset.dtype.kind != "f":
                raise CaffeError(f"blob {index} is not a floating-point dataset", path=path, layer=name)
        layout.append((name, datasets))
    return layout


def _hdf5_blob(path: Path, layer: str, index: int, dataset: Any) -> np.ndarray:
    """One dataset as float32: a fresh copy-on-write mapping when stored plainly, else read."""
    offset = dataset.id.get_offset()
    mappable = (
        offset is not None and dataset.chunks is None and dataset.compression is None and dataset.dtype == np.dtype("<f4")
    )
    if not mappable or dataset.size == 0:
        blob = np.asarray(dataset[()], dtype=np.float32)
        _check_finite((blob,), path, layer, first_index=index)
        return blob
    _check_finite((np.memmap(path, dtype="<f4", mode="r", offset=offset, shape=dataset.shape),), path, layer, index)
    return np.memmap(path, dtype="<f4", mode="c", offset=offset, shape=dataset.shape).view(np.ndarray)


def release_pages(array: np.ndarray) -> None:
    """Drop the resident pages behind a blob mapped from its file, so a blob read once stays cheap.

    The pages reload from the file on the next touch (the mapping is copy-on-write and blobs are
    never written), so the values do not change. Only pages wholly inside the blob are released.
    A no-op for arrays that are not views of a mapped file.
    """
    owner = array.base
    while owner is not None and not isinstance(owner, np.memmap):
        owner = owner.base
    handle = getattr(owner, "_mmap", None)
    if handle is None or array.nbytes == 0:
        return
    mapping_start = owner.__array_interface__["data"][0] - owner.offset % mmap.ALLOCATIONGRANULARITY
    begin = array.__array_interface__["data"][0] - mapping_start
    end = begin + array.nbytes
    first_page = -(-begin // mmap.PAGESIZE) * mmap.PAGESIZE
    last_page = end // mmap.PAGESIZE * mmap.PAGESIZE
    if last_page > first_page:
        handle.madvise(mmap.MADV_DONTNEED, first_page, last_page - first_page)


# --------------------------------------------------------------------------- assembling a Net


def load_net(weights: PathLike | None = None, prototxt: PathLike | None = None) -> Net:
    """The net to convert: structure from `prototxt` if given, else from the caffemodel; blobs by layer name.

    `weights` is a binary caffemodel or Caffe HDF5 weights (by content, or a .h5/.hdf5
    name). With both files, each prototxt layer takes the blobs of the weights layer of
    the same name (the last one, when names repeat, as Caffe's CopyTrainedLayersFrom
    leaves it); weights layers the prototxt lacks are ignored, logged and listed in `ignored_layers`. The Net's
    path is the weights file; unknown fields are prefixed with their file's name.
    """
    if weights is None and prototxt is None:
        raise CaffeError("nothing to load: give a caffemodel (weights) and/or a prototxt")
    if weights is None:
        return read_prototxt(prototxt)  # type: ignore[arg-type]
    weights_path = _input_file(weights)
    hdf5 = _looks_like_hdf5(weights_path) or weights_path.name.lower().endswith(_HDF5_SUFFIXES)
    if prototxt is None:
        if hdf5 and not _looks_like_hdf5(weights_path):
            raise CaffeError("is named like HDF5 weights but is not an HDF5 file", path=weights_path)
        if hdf5:
            raise CaffeError("HDF5 weights hold no layer definitions: give the prototxt too", path=weights_path)
        return read_caffemodel(weights_path)
    structure = read_prototxt(prototxt)
    source = read_hdf5_weights(weights_path) if hdf5 else read_caffemodel(weights_path)
    blobs_by_name = {layer.name: layer.blobs for layer in source.layers if layer.blobs}
    layers = tuple(dataclasses.replace(layer, blobs=blobs_by_name.get(layer.name, ())) for layer in structure.layers)
    ignored = sorted(set(blobs_by_name) - {layer.name for layer in structure.layers})
    if ignored:
        log.info("%s: %d weight layers are not in %s and are ignored: %s", weights_path, len(ignored), prototxt,
                 listed(ignored, 10))
    unknown = tuple(f"{Path(prototxt).name}: {entry}" for entry in structure.unknown_fields)
    unknown += tuple(f"{weights_path.name}: {entry}" for entry in source.unknown_fields)
    return Net(name=structure.name, path=str(weights_path), inputs=structure.inputs, layers=layers,
               unknown_fields=unknown, ignored_layers=tuple(ignored))


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


def _assemble(header: Any, layers: list[tuple[Any, tuple[np.ndarray, ...]]], path: Path, unknown: list[str]) -> Net:
    for param, blobs in layers:
        _check_finite(blobs, path, param.name)
    for entry in unknown:
        log.warning("%s: %s", path, entry)
    return Net(
        name=header.name,
        path=str(path),
        inputs=_inputs(header, [param for param, _ in layers], path),
        layers=tuple(
            Layer(name=p.name, type=p.type, bottoms=tuple(p.bottom), tops=tuple(p.top), param=p, blobs=blobs)
            for p, blobs in layers
        ),
        unknown_fields=tuple(unknown),
    )


def _inputs(header: Any, layers: list[Any], path: Path) -> dict[str, tuple[int, ...]]:
    """Declared inputs -> dims: legacy `input` with `input_shape` or 4 `input_dim` each, then Input layers.

    An input whose dims the file does not give (a caffemodel repeating only the names) maps to ().
    """
    names = list(header.input)
    if len(header.input_shape):
        if len(header.input_shape) != len(names):
            raise CaffeError(f"{len(names)} inputs but {len(header.input_shape)} input_shape entries", path=path)
        inputs = {name: tuple(shape.dim) for name, shape in zip(names, header.input_shape)}
    elif len(header.input_dim):
        dims = list(header.input_dim)
        if len(dims) != 4 * len(names):
            raise CaffeError(f"{len(names)} inputs need {4 * len(names)} input_dim values, found {len(dims)}", path=path)
        inputs = {name: tuple(dims[4 * i : 4 * i + 4]) for i, name in enumerate(names)}
    else:
        inputs = {name: () for name in names}
    for layer in layers:
        if layer.type != "Input":
            continue
        shapes = layer.input_param.shape
        if len(shapes) not in (0, 1, len(layer.top)):
            raise CaffeError(f"{len(shapes)} input shapes for {len(layer.top)} tops", path=path, layer=layer.name)
        for i, top in enumerate(layer.top):
            inputs[top] = tuple(shapes[0 if len(shapes) == 1 else i].dim) if len(shapes) else ()
    return inputs


def _check_finite(blobs: tuple[np.ndarray, ...], path: Path, layer: str, first_index: int = 0) -> None:
    """CaffeError naming the layer when a blob holds NaN or inf (vectorised, in bounded chunks)."""
    for index, blob in enumerate(blobs, start=first_index):
        flat = blob.reshape(-1)
        for start in range(0, flat.size, _FINITE_CHUNK):
            if not np.isfinite(flat[start : start + _FINITE_CHUNK]).all():
                raise CaffeError(f"blob {index} holds NaN or inf values", path=path, layer=layer)
