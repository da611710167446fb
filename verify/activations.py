"""The reference-activations HDF5 file (DESIGN.md): one writer, one lazy reader, every producer's interchange.

Layout: root attributes `format`="caffe-activations", `version`=1, `producer`, `prototxt`;
`/inputs/<blob>` the fed inputs (float32, N,C,H,W); `/blobs/<blob>` each top's value when the
forward pass ends (float32, Caffe layout) with attribute `order` on `/blobs` listing the names in
the order the layers first produced them. Names keep Caffe's spelling with `%` -> `%25`, `/` -> `%2F`.
The reader accepts any writer's rendering of this layout (str or bytes attributes, any float dtype).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from converter.atomic import write_atomic
from converter.caffe.hdf5_guard import check_dataset, hdf5_errors, probe_hdf5
from converter.errors import CaffeError
from verify.inputs import check_input_size

FORMAT = "caffe-activations"
VERSION = 1

_UNESCAPES = {"%25": "%", "%2F": "/", "%2f": "/"}
_ESCAPED = re.compile(r"%(?:25|2F|2f)")


def escape_name(name: str) -> str:
    """A Caffe blob name as an HDF5 link name: `%` -> `%25` first, then `/` -> `%2F`."""
    return name.replace("%", "%25").replace("/", "%2F")


def unescape_name(key: str) -> str:
    """The inverse of `escape_name` (one left-to-right pass, so `%252F` reads back as `%2F`)."""
    return _ESCAPED.sub(lambda m: _UNESCAPES[m.group(0)], key)


def write_activations(
    path: str | Path,
    *,
    producer: str,
    prototxt: str,
    inputs: Mapping[str, np.ndarray],
    blobs: Mapping[str, np.ndarray],
    order: Sequence[str] | None = None,
    compression: str | None = None,
) -> Path:
    """Write a reference activations file atomically (temp file + rename; nothing at `path` on failure).

    `blobs` is read one value at a time, so a lazy mapping keeps memory flat; `order` defaults to the
    mapping's own order and must name exactly its blobs. `compression` ("gzip" or None) is an HDF5
    filter every reader decodes transparently; it shrinks files that travel (ReLU outputs are sparse).
    """
    path = Path(path)
    names = list(blobs) if order is None else list(order)
    if len(set(names)) != len(names) or set(names) != set(blobs):
        raise ValueError(
            f"order must list each blob exactly once: order has {len(names)} names "
            f"({len(set(names))} distinct), blobs has {len(blobs)}"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    options = {"compression": compression, "shuffle": True} if compression else {}

    def write(tmp: Path) -> None:
        # libver v108: attributes over 64 KiB (a long `order`) go to dense storage instead of failing.
        with h5py.File(tmp, "w", libver=("v108", "v108")) as f:
            f.attrs["format"] = FORMAT
            f.attrs["version"] = np.int64(VERSION)
            f.attrs["producer"] = producer
            f.attrs["prototxt"] = prototxt
            group = f.create_group("inputs")
            for name, value in inputs.items():
                group.create_dataset(escape_name(name), data=np.asarray(value, dtype=np.float32), **options)
            group = f.create_group("blobs")
            for name in names:
                group.create_dataset(escape_name(name), data=np.asarray(blobs[name], dtype=np.float32), **options)
            group.attrs["order"] = np.array(names, dtype=h5py.string_dtype())

    write_atomic(path, write)
    return path


class ActivationsFile:
    """An open reference activations file: metadata and inputs in memory, blobs read on demand.

    Use as a context manager (or call `close()`); `names`/`order` list the blobs in forward order.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise CaffeError("no such reference activations file", path=self.path)
        if not h5py.is_hdf5(self.path):
            raise CaffeError("not an HDF5 file (expected a caffe-activations reference)", path=self.path)
        probe_hdf5(self.path, "reference activations file")
        with hdf5_errors(self.path, what="reference activations file"):
            self._file = h5py.File(self.path, "r")
        try:
            with hdf5_errors(self.path, what="reference activations file"):
                self._validate_and_load()
        except BaseException:
            self._file.close()
            raise

    def _fail(self, what: str) -> CaffeError:
        return CaffeError(what, path=self.path)

    def _validate_and_load(self) -> None:
        attrs = self._file.attrs
        if "format" not in attrs:
            raise self._fail(f"not a {FORMAT} file: root attribute 'format' is missing")
        fmt = self._text(attrs["format"], "format")
        if fmt != FORMAT:
            raise self._fail(f"format is '{fmt}', expected '{FORMAT}'")
        if "version" not in attrs:
            raise self._fail("root attribute 'version' is missing")
        version = attrs["version"]
        if isinstance(version, np.ndarray) and version.size == 1:
            version = version.reshape(()).item()
        if not isinstance(version, (int, np.integer)) or int(version) != VERSION:
            shown = int(version) if isinstance(version, np.integer) else repr(version)
            raise self._fail(f"unsupported version {shown} (this reader knows version {VERSION})")
        for key in ("producer", "prototxt"):
            if key not in attrs:
                raise self._fail(f"root attribute '{key}' is missing")
        self.producer: str = self._text(attrs["producer"], "producer")
        self.prototxt: str = self._text(attrs["prototxt"], "prototxt")
        for group in ("inputs", "blobs"):
            if not isinstance(self._file.get(group), h5py.Group):
                raise self._fail(f"group '/{group}' is missing")
        self.inputs: dict[str, np.ndarray] = {unescape_name(key): self._input(key) for key in self._file["inputs"]}
        blobs = self._file["blobs"]
        if "order" not in blobs.attrs:
            raise self._fail("attribute 'order' on '/blobs' is missing")
        raw_order = blobs.attrs["order"]
        if not isinstance(raw_order, np.ndarray) or raw_order.ndim != 1:
            raise self._fail("attribute 'order' on '/blobs' must be a 1-D list of blob names")
        self.order: list[str] = [self._text(item, "order") for item in raw_order]
        if len(set(self.order)) != len(self.order):
            duplicate = next(n for n in self.order if self.order.count(n) > 1)
            raise self._fail(f"attribute 'order' on '/blobs' lists blob '{duplicate}' twice")
        keys = {unescape_name(key): key for key in blobs}
        for name in self.order:
            if name not in keys:
                raise self._fail(f"attribute 'order' on '/blobs' lists blob '{name}' but '/blobs' has no such dataset")
        unlisted = sorted(set(keys) - set(self.order))
        if unlisted:
            raise self._fail(f"'/blobs' holds datasets not listed in its 'order' attribute: {', '.join(unlisted[:5])}")
        self._keys = keys
        for key in blobs:
            self._dataset("blobs", key)

    def _text(self, value: Any, what: str) -> str:
        if isinstance(value, np.ndarray) and value.shape == ():
            value = value.item()
        if isinstance(value, (bytes, np.bytes_)):
            return bytes(value).decode("utf-8")
        if isinstance(value, str):
            return value
        raise self._fail(f"attribute '{what}' must hold text, found {type(value).__name__}")

    def _dataset(self, group: str, key: str) -> h5py.Dataset:
        item = self._file[group].get(key)  # None for a dangling link
        where = f"'/{group}/{key}'"
        if not isinstance(item, h5py.Dataset):
            raise self._fail(f"{where} is not a dataset")
        check_dataset(item, self.path, where)
        return item

    def _input(self, key: str) -> np.ndarray:
        """An input, size-capped before it is read and checked finite (NaN in an input is bad input)."""
        dataset = self._dataset("inputs", key)
        check_input_size(dataset.shape, self.path, f"'/inputs/{key}'")
        return self._finite(np.asarray(dataset[()], dtype=np.float32), f"'/inputs/{key}'")

    def _finite(self, value: np.ndarray, where: str) -> np.ndarray:
        if not np.isfinite(value).all():
            raise self._fail(f"{where} holds NaN or inf values")
        return value

    @property
    def names(self) -> list[str]:
        """Blob names in the order the layers first produced them."""
        return list(self.order)

    def __contains__(self, name: object) -> bool:
        return name in self._keys

    def shape(self, name: str) -> tuple[int, ...]:
        """The blob's shape, without reading its data."""
        with hdf5_errors(self.path, what="reference activations file"):
            return tuple(self._file["blobs"][self._key(name)].shape)

    def get(self, name: str) -> np.ndarray:
        """The blob's value as float32 (read from disk now)."""
        with hdf5_errors(self.path, what="reference activations file"):
            value = np.asarray(self._file["blobs"][self._key(name)][()], dtype=np.float32)
        return self._finite(value, f"blob '{name}'")

    def _key(self, name: str) -> str:
        try:
            return self._keys[name]
        except KeyError:
            raise self._fail(f"blob '{name}' is not in the reference") from None

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> ActivationsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_activations(path: str | Path) -> ActivationsFile:
    """Open and validate a reference activations file; every layout error is a one-line CaffeError."""
    return ActivationsFile(path)
