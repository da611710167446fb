"""Opening Caffe's input files: checks that name the file, content sniffing, releasing mapped blob pages."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import numpy as np

from converter.errors import CaffeError

PathLike = str | os.PathLike[str]

HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
HDF5_SUFFIXES = (".h5", ".hdf5")


def input_file(path: PathLike) -> Path:
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


def looks_like_hdf5(path: Path) -> bool:
    """Whether the file starts with HDF5's signature (Caffe's weights may be HDF5 under any name)."""
    with open(path, "rb") as stream:
        return stream.read(len(HDF5_MAGIC)) == HDF5_MAGIC


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
