"""The one error type users see: a single line naming the file and, where known, the layer."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


class CaffeError(Exception):
    """A bad input or output: `str()` is one line `<file>: layer '<name>': <what>`."""

    def __init__(self, message: str, *, path: str | Path | None = None, layer: str | None = None) -> None:
        self.message = message
        self.path = None if path is None else str(path)
        self.layer = layer
        super().__init__(self.__str__())

    def __str__(self) -> str:
        parts = []
        if self.path:
            parts.append(self.path)
        if self.layer:
            parts.append(f"layer '{self.layer}'")
        parts.append(self.message)
        return ": ".join(parts).replace("\n", " ")


def listed(items: Sequence[str], limit: int = 6) -> str:
    """The first `limit` items joined by commas, plus how many more: keeps an error to one readable line."""
    shown = ", ".join(items[:limit])
    return shown + (f" (+{len(items) - limit} more)" if len(items) > limit else "")
