"""The layer registry: one converter per Caffe type name, plus user plugins.

A converter is a function `(spec: LayerSpec) -> nn.Module`. It reads the layer's typed
parameters and its bottoms' shapes, checks them (a bad value is a CaffeError naming the
layer), builds a module whose `forward(*bottoms)` returns one tensor per top (a tensor for
one top, a tuple for several), and loads the layer's Caffe blobs into it with `spec.blob`.
A module holding Caffe blobs lists their attribute names in Caffe's blob order in
`caffe_blobs` (that is how shared parameters are tied and how exporters read them back).

Users add types without editing the package: `@register("MyType")` on their converter, or
`--plugin MODULE` on the command line (`load_plugin` imports the module, whose decorators
register). Registering a name twice replaces the earlier converter (with a log line), so a
plugin may override a built-in one.
"""

from __future__ import annotations

import importlib
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from converter.caffe.netdesc import Layer
from converter.errors import CaffeError, listed
from converter.layers.data import INPUT_TYPES, SILENCE

log = logging.getLogger(__name__)

Shape = tuple[int, ...]


@dataclass(frozen=True)
class LayerSpec:
    """What a converter works on: the layer (typed `param`, Caffe `blobs`) and its bottoms' shapes."""

    layer: Layer
    shapes: tuple[Shape, ...]
    path: str  # the net's file, for error messages
    tied: bool = False  # every blob is an earlier layer's shared parameter: its own tensors are placeholders
    phase: str = "TEST"  # the net's phase (BatchNorm's use_global_stats and Dropout default by it)

    @property
    def param(self) -> Any:
        return self.layer.param

    def error(self, message: str) -> CaffeError:
        """A CaffeError naming the net file and this layer."""
        return CaffeError(message, path=self.path, layer=self.layer.name)

    def check(self, condition: bool, message: str) -> None:
        """Raise `error(message)` unless `condition` holds (parameter validation)."""
        if not condition:
            raise self.error(message)

    def bottoms(self, *counts: int) -> None:
        """The layer must have one of `counts` bottoms (Caffe's ExactNumBottomBlobs / Min/Max)."""
        if len(self.shapes) not in counts:
            wanted = " or ".join(str(c) for c in counts)
            raise self.error(f"{self.layer.type} takes {wanted} bottom(s), got {len(self.shapes)}")

    def tops(self, *counts: int) -> None:
        """The layer must have one of `counts` tops."""
        if len(self.layer.tops) not in counts:
            wanted = " or ".join(str(c) for c in counts)
            raise self.error(f"{self.layer.type} makes {wanted} top(s), got {len(self.layer.tops)}")

    def blob_count(self, *counts: int) -> None:
        """A layer with weights must carry one of `counts` blobs (none at all: built without weights)."""
        have = len(self.layer.blobs)
        if have and have not in counts:
            wanted = " or ".join(str(c) for c in counts)
            raise self.error(f"{self.layer.type} needs {wanted} weight blob(s), the weights hold {have}")

    def blob(self, index: int, shape: Shape) -> torch.Tensor | None:
        """Blob `index` as a float32 tensor of `shape`, or None when the layer has no weights.

        A legacy blob (V1 nets store 4-D blobs padded with leading 1s, e.g. an InnerProduct
        weight as 1x1xNxK) is accepted when dropping its leading 1s gives `shape` without its
        leading 1s; any other shape is an error naming the layer and both shapes.
        """
        if not self.layer.blobs:
            return None
        blob = self.layer.blobs[index]
        if tuple(blob.shape) != tuple(shape):
            if _strip_ones(blob.shape) != _strip_ones(shape) or math.prod(blob.shape) != math.prod(shape):
                raise self.error(f"weight blob {index} has shape {tuple(blob.shape)}, expected {tuple(shape)}")
        # One copy into fresh (aligned) memory: a view of the mapped file would save it, but BLAS picks its
        # kernels by alignment, so a build and its reload from the checkpoint would differ in the last bits.
        # Blobs that will be replaced by an earlier layer's shared tensor stay views (no read, no copy).
        tensor = torch.from_numpy(np.ascontiguousarray(blob, dtype=np.float32).reshape(shape))
        return tensor if self.tied else tensor.clone()

    def new(self, module_class: type[nn.Module], *args: Any, **kwargs: Any) -> nn.Module:
        """`module_class(*args, **kwargs)`; on the meta device (no memory, no random initialisation) when
        the layer has blobs, which `load` then puts in place of every parameter, or when its parameters
        will be tied to an earlier layer's (ResNet-101's random init costs more than the whole build;
        `nn.utils.skip_init` would make torch import sympy: 1.2 s)."""
        if self.layer.blobs or self.tied:
            return module_class(*args, device="meta", **kwargs)
        return module_class(*args, **kwargs)

    def load(self, module: nn.Module) -> nn.Module:
        """Put the layer's blobs in `module`'s `caffe_blobs` attributes (stored in Caffe's shapes).

        The blob count must match; a layer without weights keeps the module's initial values.
        """
        names = getattr(module, "caffe_blobs", ())
        self.blob_count(len(names))
        if self.layer.blobs:
            for index, name in enumerate(names):
                path, _, attr = name.rpartition(".")
                owner = module.get_submodule(path) if path else module
                value = self.blob(index, tuple(getattr(owner, attr).shape))
                if attr in owner._parameters:
                    owner._parameters[attr] = nn.Parameter(value)
                else:
                    owner._buffers[attr] = value
        return module


def _strip_ones(shape: Sequence[int]) -> tuple[int, ...]:
    dims = list(shape)
    while dims and dims[0] == 1:
        dims.pop(0)
    return tuple(dims)


Converter = Callable[[LayerSpec], nn.Module]


@dataclass(frozen=True)
class Registration:
    """A registered converter and where it came from (shown by `inspect` and in manifests)."""

    type_name: str
    convert: Converter

    @property
    def qualname(self) -> str:
        return f"{self.convert.__module__}.{self.convert.__qualname__}"


_REGISTRY: dict[str, Registration] = {}


def register(type_name: str, *aliases: str) -> Callable[[Converter], Converter]:
    """Decorator: register `convert` for the Caffe type `type_name` (and any alias names)."""

    def decorate(convert: Converter) -> Converter:
        for name in (type_name, *aliases):
            if name in _REGISTRY and _REGISTRY[name].convert is not convert:
                log.info("converter for %s replaced by %s", name, convert.__qualname__)
            _REGISTRY[name] = Registration(name, convert)
        return convert

    return decorate


def unregister(type_name: str) -> None:
    """Remove the converter of `type_name` (for plugins and tests that add a temporary type)."""
    _REGISTRY.pop(type_name, None)


def registration(type_name: str) -> Registration | None:
    """The converter registered for `type_name`, or None."""
    _load_builtins()
    return _REGISTRY.get(type_name)


def supported_types() -> tuple[str, ...]:
    """Every Caffe type a net may use: the registered converters, the input/data layers and Silence."""
    _load_builtins()
    return tuple(sorted(set(_REGISTRY) | INPUT_TYPES | {SILENCE}))


def converter_for(layer: Layer, path: str) -> Registration:
    """The registration for `layer`'s type; an unknown type names the layer, its type and what is supported."""
    found = registration(layer.type)
    if found is None:
        raise CaffeError(
            f"unsupported layer type '{layer.type}' (supported: {listed(list(supported_types()), 100)}; "
            "add one with @converter.layers.register or --plugin MODULE)",
            path=path,
            layer=layer.name,
        )
    return found


def load_plugin(module_name: str) -> None:
    """Import `module_name` so that its `@register` decorators run; a failed import is one CaffeError line."""
    try:
        importlib.import_module(module_name)
    except ImportError as exc:
        raise CaffeError(f"cannot import plugin module '{module_name}': {exc}") from None
    except Exception as exc:  # a plugin's own bug: still one line, naming the plugin
        raise CaffeError(f"plugin module '{module_name}' failed while importing: {type(exc).__name__}: {exc}") from None


_BUILTIN_MODULES = ("vision", "normalization", "activation", "common")


def _load_builtins() -> None:
    """Import the built-in converter families once (they register themselves)."""
    for name in _BUILTIN_MODULES:
        importlib.import_module(f"converter.layers.{name}")
