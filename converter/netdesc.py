"""The read-only net description every reader returns and every consumer reads."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

import numpy as np


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
