"""The guard where untrusted HDF5 bytes enter the project (Caffe HDF5 weights, reference activations).

h5py reports a damaged file with many exception types, from many places: OSError when the file
or an object header cannot be opened, RuntimeError from group and link iteration ("bad symbol
table node signature", "addr overflow"), KeyError from an object lookup ("incorrect metadata
checksum"), ValueError and TypeError from dtype and selection handling. `hdf5_errors` turns all
of them into one CaffeError naming the file (and the layer or dataset). `check_dataset` refuses,
before anything is read, a dataset whose size cannot be real: a scalar where an array belongs,
or more bytes than the file stores for it (unfiltered data must be stored in full; filtered data
within a generous compression ratio), so a forged shape cannot make a reader allocate gigabytes.
Some damage makes the HDF5 library itself loop forever or crash (a corrupt global heap under a
text attribute): no exception ever comes, so `probe_hdf5` first reads every attribute and object
header in a forked child under a time limit, and refuses the file when the child does not finish.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import h5py

from converter.errors import CaffeError

H5PY_ERRORS = (OSError, RuntimeError, KeyError, ValueError, TypeError, AttributeError)
MAX_COMPRESSION_RATIO = 4096  # gzip of all-zero data reaches about 1000:1
PROBE_SECONDS = 5.0  # reading the metadata of a real file takes milliseconds


@contextlib.contextmanager
def hdf5_errors(path: str | Path, layer: str | None = None, what: str = "HDF5 file") -> Iterator[None]:
    """Any h5py failure inside the block is a one-line CaffeError: the file is damaged or not what it claims."""
    try:
        yield
    except CaffeError:
        raise
    except RecursionError:
        raise CaffeError(f"damaged {what}: its groups nest too deeply", path=path, layer=layer) from None
    except H5PY_ERRORS as error:
        detail = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CaffeError(f"damaged {what} ({detail.strip(chr(39))})", path=path, layer=layer) from None


def check_dataset(dataset: h5py.Dataset, path: str | Path, where: str, *, layer: str | None = None) -> None:
    """CaffeError unless `dataset` is a non-scalar floating-point array whose bytes the file really holds."""
    if dataset.dtype.kind != "f":
        raise CaffeError(f"{where} is not a floating-point dataset (dtype {dataset.dtype})", path=path, layer=layer)
    if dataset.shape is None or dataset.ndim == 0:
        raise CaffeError(f"{where} is a scalar, expected an array", path=path, layer=layer)
    declared = dataset.size * dataset.dtype.itemsize
    if declared == 0:
        return
    stored = dataset.id.get_storage_size()
    filtered = dataset.chunks is not None and bool(dataset.id.get_create_plist().get_nfilters())
    limit = stored * MAX_COMPRESSION_RATIO if filtered else stored
    if declared > limit:
        raise CaffeError(
            f"{where} declares shape {tuple(dataset.shape)} ({declared} bytes) but the file stores {stored} bytes "
            "for it (truncated or damaged)", path=path, layer=layer)


def probe_hdf5(path: str | Path, what: str = "HDF5 file", timeout: float = PROBE_SECONDS) -> None:
    """CaffeError when reading the file's metadata (attributes, groups, dataset headers) loops or crashes
    the HDF5 library; it is read in a forked child, so this process never runs into either.

    Errors the child meets are left to the caller's own read (it reports them with its own words).
    A no-op where fork is unavailable.
    """
    if not hasattr(os, "fork"):
        return
    pid = os.fork()
    if pid == 0:  # the child: walk everything, report only by exit status
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
        signal.alarm(int(timeout) + 2)  # ends the child even if this process is killed first (the kernel acts)
        code = 0
        try:
            _walk(path)
        except BaseException:
            code = 1
        os._exit(code)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise CaffeError(f"damaged {what}: reading its metadata does not finish (the HDF5 library loops on it)",
                             path=path)
        time.sleep(0.002)
    if os.WIFSIGNALED(status):
        raise CaffeError(f"damaged {what}: reading its metadata crashes the HDF5 library "
                         f"(signal {os.WTERMSIG(status)})", path=path)


def _walk(path: str | Path) -> None:
    """Touch every attribute value and object header in the file (the metadata readers will read).

    An error on one object does not stop the walk: the readers may still reach the others.
    """
    with h5py.File(path, "r") as h5:
        names: list[str] = []
        _touch(h5)
        with contextlib.suppress(*H5PY_ERRORS):
            h5.visit(names.append)
        for name in names:
            with contextlib.suppress(*H5PY_ERRORS):
                _touch(h5[name])


def _touch(item: h5py.HLObject) -> None:
    for key in list(item.attrs):
        with contextlib.suppress(*H5PY_ERRORS):
            item.attrs[key]
    if isinstance(item, h5py.Dataset):
        item.shape, item.dtype, item.id.get_storage_size()
