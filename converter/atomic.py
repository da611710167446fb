"""Atomic file writes: write a temporary beside the target, then rename it over the target.

A failed run (an exception, a full disk) leaves nothing new at the output path, and a file
already there stays as it was. Every writer in the project goes through here.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

from converter.errors import CaffeError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def temporary_beside(path: Path) -> Path:
    """A new empty file in `path`'s folder (same filesystem, so the rename is atomic), mode as the umask allows."""
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    os.chmod(name, 0o666 & ~_umask())  # mkstemp makes 0600; the result should look like any other file
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
