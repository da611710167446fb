"""Caffe's HDF5 weights (`.caffemodel.h5`: `/data/<layer>/<i>`), read lazily and written atomically."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from converter.atomic import write_atomic
from converter.caffe.files import PathLike, input_file, looks_like_hdf5
from converter.caffe.hdf5_guard import check_dataset, hdf5_errors, probe_hdf5
from converter.caffe.netdesc import Layer, Net, check_finite
from converter.caffe.schema import caffe_pb
from converter.errors import CaffeError


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
    p = input_file(path)
    if looks_like_hdf5(p):  # else h5py's own open error says what the file is not
        probe_hdf5(p, "HDF5 weights file")
    try:
        h5 = h5py.File(p, "r")
    except OSError as exc:
        raise CaffeError(f"not an HDF5 file ({exc})", path=p) from None
    with h5:
        with hdf5_errors(p, what="HDF5 weights file"):
            layout = _hdf5_layout(h5, p)
        for name, datasets in layout:
            with hdf5_errors(p, layer=name, what="HDF5 weights file"):
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
        datasets = []
        for index, key in enumerate(keys):
            with hdf5_errors(path, layer=name, what="HDF5 weights file"):
                dataset = group.get(key)  # None for a dangling soft link
                if not isinstance(dataset, h5py.Dataset):
                    raise CaffeError(f"blob {index} is not a dataset (a group, or a link to nothing)", path=path,
                                     layer=name)
                check_dataset(dataset, path, f"blob {index}", layer=name)
            datasets.append(dataset)
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
        check_finite((blob,), path, layer, first_index=index)
        return blob
    check_finite((np.memmap(path, dtype="<f4", mode="r", offset=offset, shape=dataset.shape),), path, layer, index)
    return np.memmap(path, dtype="<f4", mode="c", offset=offset, shape=dataset.shape).view(np.ndarray)


def write_hdf5_weights(
    path: str | os.PathLike[str],
    blobs: Mapping[str, Sequence[np.ndarray]] | Iterable[tuple[str, Sequence[np.ndarray]]],
) -> None:
    """Write Caffe's HDF5 weights layout (`/data/<layer>/<i>`, float32, contiguous), atomically.

    `blobs` may be a mapping or an iterable of (layer name, arrays) pairs; each dataset is
    written as it comes, so a lazy iterable writes a file larger than memory.
    """
    items = blobs.items() if isinstance(blobs, Mapping) else blobs

    def write(tmp: Path) -> None:
        with h5py.File(tmp, "w") as h5:
            data = h5.create_group("data")
            for name, arrays in items:
                group = data.create_group(name)
                for i, array in enumerate(arrays):
                    group.create_dataset(str(i), data=np.asarray(array, dtype="<f4"))

    write_atomic(path, write)
