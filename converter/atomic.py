"""Atomic writes: a file (a temporary beside the target, renamed over it) or a whole folder (a
staging folder beside the target, exchanged with it in one step).

A failed run (an exception, a full disk) leaves nothing new at the output path, and a file or
folder already there stays as it was. Every writer in the project goes through here.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable

from converter.errors import CaffeError


def umask() -> int:
    """The process's umask (read by setting and restoring it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def temporary_beside(path: Path) -> Path:
    """A new empty file in `path`'s folder (same filesystem, so the rename is atomic), mode as the umask allows."""
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    os.chmod(name, 0o666 & ~umask())  # mkstemp makes 0600; the result should look like any other file
    return Path(name)


def write_atomic(path: str | os.PathLike[str], write: Callable[[Path], None]) -> Path:
    """Run `write(temporary)`, then rename the temporary over `path`; on failure remove it and re-raise.

    An OSError (folder missing, disk full, no permission) becomes a one-line CaffeError naming `path`.
    """
    target = Path(path)
    temporary = None
    try:
        temporary = temporary_beside(target)
        write(temporary)
        os.replace(temporary, target)
    except BaseException as error:
        if temporary is not None:
            temporary.unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise CaffeError(f"cannot write: {error.strerror or error}", path=target) from None
        raise
    return target


# --------------------------------------------------------------------------- folders

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2  # linux/fs.h
_SYS_RENAMEAT2 = {"x86_64": 316, "aarch64": 276}  # for a C library without the renameat2 wrapper (glibc < 2.28)


def _renameat2() -> Callable[..., int] | None:
    """The C library's renameat2, or one through syscall(2); None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    function = getattr(libc, "renameat2", None)
    if function is not None:
        function.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
        return function
    number = _SYS_RENAMEAT2.get(platform.machine())
    if number is None:
        return None
    syscall = libc.syscall
    return lambda *args: syscall(ctypes.c_long(number), *args)


def exchange_folders(a: Path, b: Path) -> bool:
    """Swap two existing folders' names in one atomic step (renameat2 RENAME_EXCHANGE); False where unsupported.

    `os.rename` cannot put a folder over a non-empty one, and moving the old one aside first
    leaves a moment where the name is missing; the exchange has no such moment.
    """
    function = _renameat2()
    if function is None:
        return False
    result = function(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):  # old kernel, or a filesystem without the flag
        return False
    raise OSError(code, os.strerror(code), str(b))


def replace_folder(path: str | os.PathLike[str], build: Callable[[Path], None], *,
                   owned: Callable[[Path], bool]) -> Path:
    """Build a new folder beside `path` with `build(staging)`, then put it at `path` as one unit.

    `path` must be absent, an empty folder, or a folder `owned(path)` recognises as an earlier
    output of the same writer; anything else (a user's folder, a file) is refused with a
    CaffeError and left untouched. The new set is built in a sibling staging folder and then
    exchanged with the old one in one step (`exchange_folders`), so a reader sees the old set or
    the new set, never a mix, and nothing of the old set (a stale report) survives. Where the
    exchange is unavailable (not Linux, an old kernel, a filesystem without RENAME_EXCHANGE),
    the old folder is renamed aside and the new one renamed in: between those two renames
    `path` is briefly missing (still never a mix). On any failure the staging folder and any
    parent folders this call created are removed and the old set is as it was.
    """
    if not os.fspath(path):
        raise CaffeError("the output folder is an empty string; give a folder path")
    target = Path(path)
    if target.exists() or target.is_symlink():
        if not target.is_dir() or target.is_symlink():
            raise CaffeError("exists and is not a folder; give a new or an earlier output folder", path=target)
        if any(target.iterdir()) and not owned(target):
            raise CaffeError("folder is neither empty nor an earlier output of this tool (no manifest.json of "
                             "ours): refusing to replace it; choose another folder", path=target)
    try:
        created = _make_parents(target.parent)
    except OSError as error:
        raise CaffeError(f"cannot create the output folder: {error.strerror or error}", path=target) from None
    staging = None
    try:
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".new"))
        os.chmod(staging, 0o777 & ~umask())  # mkdtemp makes 0700; the result should look like any folder
        build(staging)
        _put_in_place(staging, target)
    except BaseException as error:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        for folder in created:
            with contextlib.suppress(OSError):
                folder.rmdir()
        if isinstance(error, OSError):
            raise CaffeError(f"cannot write: {error.strerror or error}", path=target) from None
        raise
    return target


def _put_in_place(staging: Path, target: Path) -> None:
    if not target.exists():
        os.rename(staging, target)
        return
    if exchange_folders(staging, target):
        shutil.rmtree(staging)  # now holds the old set
        return
    aside = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".old"))
    os.rename(target, aside / "old")  # from here until the next rename, `target` is missing
    os.rename(staging, target)
    shutil.rmtree(aside)


def _make_parents(folder: Path) -> list[Path]:
    """Create `folder` and its missing parents; return those created, deepest first, for cleanup."""
    missing = []
    probe = folder
    while not probe.exists() and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    folder.mkdir(parents=True, exist_ok=True)
    return missing
