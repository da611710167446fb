"""The read-only net description every reader returns and every consumer reads, and how readers assemble it.

`assemble_net` is the one place a reader's parsed layers become a Net: declared inputs are
resolved (legacy `input`/`input_shape`/`input_dim` and Input layers) and every blob is checked
for NaN/inf.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from types import MappingProxyType
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from converter.errors import CaffeError

log = logging.getLogger(__name__)

FINITE_CHUNK = 1 << 22  # elements per vectorised NaN/inf check (bounds the temporary mask)


@dataclass(frozen=True)
class Layer:
    """One Caffe layer: names, typed parameters and its weight blobs (float32, Caffe shape, read-only).

    `param` is the schema's LayerParameter message with `blobs` cleared, so typed
    parameters read as `layer.param.convolution_param.dilation` etc. Treat it as read-only.
    """

    name: str
    type: str
    bottoms: tuple[str, ...]
    tops: tuple[str, ...]
    param: Any
    blobs: tuple[np.ndarray, ...] = ()


@dataclass(frozen=True)
class Net:
    """A whole net: declared inputs (name -> N,C,H,W) and layers in file order."""

    name: str
    path: str
    inputs: Mapping[str, tuple[int, ...]]
    layers: tuple[Layer, ...]
    unknown_fields: tuple[str, ...] = ()
    ignored_layers: tuple[str, ...] = ()  # weights layers with blobs that the net definition lacks
    definition: str = ""  # the file the layer definitions come from, when not `path` (a separate prototxt)
    _by_name: Mapping[str, Layer] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "inputs", MappingProxyType(dict(self.inputs)))
        object.__setattr__(self, "_by_name", MappingProxyType({layer.name: layer for layer in self.layers}))

    def layer(self, name: str) -> Layer:
        """The layer called `name`; KeyError names the net file when it is absent."""
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"{self.path}: no layer named '{name}'") from None

    def has_layer(self, name: str) -> bool:
        return name in self._by_name

    @property
    def definition_path(self) -> str:
        """The file to name for an error in a layer's definition (its type, parameters, bottoms)."""
        return self.definition or self.path


def assemble_net(header: Any, layers: list[tuple[Any, tuple[np.ndarray, ...]]], path: Path, unknown: list[str]) -> Net:
    """The Net of a parsed NetParameter header and its (LayerParameter, blobs) pairs; unknown fields are logged."""
    for param, blobs in layers:
        check_finite(blobs, path, param.name)
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


def check_finite(blobs: tuple[np.ndarray, ...], path: Path, layer: str, first_index: int = 0) -> None:
    """CaffeError naming the layer when a blob holds NaN or inf (vectorised, in bounded chunks)."""
    for index, blob in enumerate(blobs, start=first_index):
        flat = blob.reshape(-1)
        for start in range(0, flat.size, FINITE_CHUNK):
            if not np.isfinite(flat[start : start + FINITE_CHUNK]).all():
                raise CaffeError(f"blob {index} holds NaN or inf values", path=path, layer=layer)
