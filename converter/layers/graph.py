"""The graph builder: a Caffe `Net` -> `CaffeNet`, an nn.Module that runs the net's layers.

Caffe runs layers in file order; so does `CaffeNet`. A bottom must be produced by an earlier
layer (or be an input); a top may repeat an existing blob only in place (top i == bottom i),
and then the blob's name holds the new value from there on, as in Caffe. Split needs no
special case: several consumers read one tensor. Outputs are Caffe's: blobs that no kept
layer consumes. Shapes are inferred layer by layer (each module run on meta tensors), so
every converter sees its bottoms' shapes and `inspect` shows every top's shape.

Parameters shared through `param { name: ... }` are one tensor: the first layer using a name
owns it, later layers use the owner's tensor (their copies in the caffemodel must be
identical, with the same shape, lr_mult and decay_mult). Only the owner's entry appears in
the state dict.

State-dict keys: `layers.<layer key>.<attribute>`, where the layer key is the Caffe layer
name with `%` written `%25` and `.` written `%2E` (PyTorch reserves `.` in module names);
`/` and every other character stay as they are. `caffe_blobs(layer)` gives a layer's blobs
back in Caffe's order and shapes.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from converter.caffe.files import release_pages
from converter.caffe.netdesc import Layer, Net
from converter.errors import CaffeError
from converter.layers.data import INPUT_TYPES, SILENCE, in_phase, is_dropped_type, stated_shapes
from converter.layers.registry import LayerSpec, Shape, converter_for

log = logging.getLogger(__name__)

ARCH = "caffe_net"  # the manifest's model arch of a registry-built checkpoint


def layer_key(name: str) -> str:
    """The module (and state-dict) key of a Caffe layer name: `%` -> `%25`, `.` -> `%2E`."""
    return name.replace("%", "%25").replace(".", "%2E")


def layer_name(key: str) -> str:
    """The inverse of `layer_key`."""
    return key.replace("%2E", ".").replace("%25", "%")


@dataclass(frozen=True)
class SharedParam:
    """A blob of this layer that is another layer's parameter (`param { name }`)."""

    name: str
    index: int
    owner: str  # the layer that holds it


@dataclass(frozen=True)
class LayerInfo:
    """One kept layer as built: what `inspect` prints and the manifest records."""

    name: str
    key: str  # the module key: layer_key(name), plus `%23<n>` for the n-th repeat of a name
    type: str
    bottoms: tuple[str, ...]
    tops: tuple[str, ...]
    bottom_shapes: tuple[Shape, ...]
    top_shapes: tuple[Shape, ...]
    converter: str
    parameters: int  # values this layer owns (shared ones count at their owner)
    shared: tuple[SharedParam, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "key": self.key,
            "type": self.type,
            "bottoms": list(self.bottoms),
            "tops": list(self.tops),
            "top_shapes": [list(s) for s in self.top_shapes],
            "converter": self.converter,
            "parameters": self.parameters,
            "shared": [{"name": s.name, "blob": s.index, "owner": s.owner} for s in self.shared],
        }


@dataclass(frozen=True)
class LeftOut:
    """A layer of the file that the built module does not run, and why."""

    name: str
    type: str
    reason: str


@dataclass(frozen=True)
class Step:
    key: str
    bottoms: tuple[str, ...]
    tops: tuple[str, ...]
    frees: tuple[str, ...] = ()  # blobs no later step reads (dropped when not all blobs are kept)


@dataclass
class _Tie:
    key: str
    attr: str
    owner_key: str
    owner_attr: str


@dataclass(frozen=True)
class Graph:
    """The built net's description: inputs with shapes, outputs, kept and left-out layers."""

    name: str
    phase: str
    inputs: Mapping[str, Shape]
    outputs: tuple[str, ...]
    layers: tuple[LayerInfo, ...]
    left_out: tuple[LeftOut, ...]
    blob_shapes: Mapping[str, Shape] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "phase": self.phase,
            "inputs": {name: list(shape) for name, shape in self.inputs.items()},
            "outputs": list(self.outputs),
            "layers": [info.to_json() for info in self.layers],
            "left_out": [{"name": e.name, "type": e.type, "reason": e.reason} for e in self.left_out],
        }


class CaffeNet(nn.Module):
    """A Caffe net as a module: `forward(**inputs)` (or positional, in `input_names` order) returns
    the output blobs by name; `run(inputs, keep=...)` returns any blobs, `keep="all"` every blob
    (each with its value when the forward ends, as Caffe leaves it, in the order first produced)."""

    def __init__(self, graph: Graph, layers: nn.ModuleDict, steps: tuple[Step, ...], ties: list[_Tie]) -> None:
        super().__init__()
        self.graph = graph
        self.layers = layers
        self.steps = steps
        self._ties = ties
        self._retie()

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(self.graph.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return self.graph.outputs

    def forward(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> dict[str, torch.Tensor]:
        if len(args) > len(self.input_names):
            raise TypeError(f"{len(args)} positional inputs for a net with inputs {list(self.input_names)}")
        feed = dict(zip(self.input_names, args))
        for name, value in kwargs.items():
            if name in feed:
                raise TypeError(f"input '{name}' given twice")
            feed[name] = value
        return self.run(feed)

    def run(self, inputs: Mapping[str, torch.Tensor], keep: Collection[str] | str = ()) -> dict[str, torch.Tensor]:
        """Run the net on `inputs` (every input blob by name); return the outputs plus the blobs in
        `keep` (`"all"`: every blob, inputs included, in the order they were first produced)."""
        missing = [name for name in self.input_names if name not in inputs]
        extra = [name for name in inputs if name not in self.graph.inputs]
        if missing or extra:
            raise ValueError(f"net inputs are {list(self.input_names)}; missing {missing}, unexpected {extra}")
        keep_all = keep == "all"
        wanted = set(self.output_names) | (set() if keep_all else set(keep))
        blobs: dict[str, torch.Tensor] = {name: inputs[name] for name in self.input_names}
        for step in self.steps:
            out = self.layers[step.key](*[blobs[b] for b in step.bottoms])
            if isinstance(out, torch.Tensor):
                out = (out,)
            for top, value in zip(step.tops, out):
                blobs[top] = value
            if not keep_all:
                for name in step.frees:
                    if name not in wanted:
                        blobs.pop(name, None)
        if keep_all:
            return blobs
        unknown = [name for name in wanted if name not in blobs]
        if unknown:
            raise KeyError(f"no blobs named {sorted(unknown)} in net '{self.graph.name}'")
        return {name: blobs[name] for name in blobs if name in wanted}

    def run_layer(self, name: str, *bottoms: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """One layer alone on given bottoms (teacher forcing); its tops as a tuple."""
        return self.run_key(layer_key(name), *bottoms)

    def run_key(self, key: str, *bottoms: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """`run_layer` by module key (`LayerInfo.key`: tells apart layers that repeat a name)."""
        out = self.layers[key](*bottoms)
        return (out,) if isinstance(out, torch.Tensor) else tuple(out)

    def layer_module(self, name: str) -> nn.Module:
        """The module running Caffe layer `name`."""
        return self.layers[layer_key(name)]

    def caffe_blobs(self, name: str) -> list[torch.Tensor]:
        """Layer `name`'s blobs in Caffe's order and shapes (shared ones are the owner's tensors)."""
        module = self.layer_module(name)
        return [_get(module, attr) for attr in getattr(module, "caffe_blobs", ())]

    def _retie(self) -> None:
        for tie in self._ties:
            owner = _get(self.layers[tie.owner_key], tie.owner_attr)
            _alias(self.layers[tie.key], tie.attr, owner)

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> CaffeNet:
        # .to()/.cuda()/.double() may replace the owners' tensors: point the sharers at the new ones.
        super()._apply(fn, *args, **kwargs)
        self._retie()
        return self


def _owner(module: nn.Module, attr: str) -> tuple[nn.Module, str]:
    path, _, name = attr.rpartition(".")
    return (module.get_submodule(path) if path else module), name


def _get(module: nn.Module, attr: str) -> torch.Tensor:
    owner, name = _owner(module, attr)
    return getattr(owner, name)


def _alias(module: nn.Module, attr: str, tensor: torch.Tensor) -> None:
    """Make `module.attr` the given tensor without registering it (it belongs to another layer)."""
    owner, name = _owner(module, attr)
    owner._parameters.pop(name, None)
    owner._buffers.pop(name, None)
    object.__setattr__(owner, name, tensor)


def build_net(
    net: Net,
    *,
    phase: str = "TEST",
    input_shapes: Mapping[str, Iterable[int]] | None = None,
) -> CaffeNet:
    """Build `net` (from `converter.caffe.load.load_net`) into a `CaffeNet` with its weights loaded.

    Input shapes come from the net or from `input_shapes` (which wins). Every bad input is a
    CaffeError naming the file and layer. The module is in eval mode.
    """
    return _Builder(net, phase, {k: tuple(int(d) for d in v) for k, v in (input_shapes or {}).items()}).build()


class _Builder:
    def __init__(self, net: Net, phase: str, input_shapes: dict[str, Shape]) -> None:
        self.net = net
        self.path = net.path
        self.phase = phase
        self.overrides = input_shapes
        self.shapes: dict[str, Shape] = {}
        self.producer: dict[str, str] = {}
        self.inputs: dict[str, Shape] = {}
        self.modules = nn.ModuleDict()
        self.kept: list[tuple[Layer, LayerInfo]] = []
        self.left_out: list[LeftOut] = []
        self.consumed: set[str] = set()
        self.silenced: set[str] = set()
        self.param_names: set[str] = set()  # `param { name }` seen so far (their later users are tied)

    def error(self, message: str, layer: str | None = None) -> CaffeError:
        return CaffeError(message, path=self.path, layer=layer)

    def build(self) -> CaffeNet:
        self._declare_legacy_inputs()
        has_weights = any(layer.blobs for layer in self.net.layers)
        for layer in self.net.layers:
            if not in_phase(layer, self.phase):
                self.left_out.append(LeftOut(layer.name, layer.type, f"not in the {self.phase} phase"))
            elif layer.type in INPUT_TYPES:
                self._declare_inputs(layer)
            elif layer.type == SILENCE:
                self._check_bottoms(layer)
                self.silenced.update(layer.bottoms)
                self.left_out.append(LeftOut(layer.name, layer.type, "consumes its bottoms; nothing to compute"))
            elif is_dropped_type(layer.type):
                self.left_out.append(LeftOut(layer.name, layer.type, "loss/accuracy/writer layer, not run at inference"))
            else:
                self._add(layer)
        unknown = sorted(set(self.overrides) - set(self.inputs))
        if unknown:
            raise self.error(f"--input-shape names {unknown}, which are not inputs of the net (inputs: {list(self.inputs)})")
        ties, owned = self._tie_shared(has_weights)
        infos = [
            dataclasses.replace(info, parameters=owned.get(info.key, 0), shared=self._shared.get(info.key, ()))
            for _, info in self.kept
        ]
        used_inputs = {name: shape for name, shape in self.inputs.items() if name in self.consumed}
        steps = self._steps()
        outputs = self._outputs()
        graph = Graph(
            name=self.net.name,
            phase=self.phase,
            inputs=used_inputs,
            outputs=outputs,
            layers=tuple(infos),
            left_out=tuple(self.left_out),
            blob_shapes={name: shape for name, shape in self.shapes.items() if name not in self.inputs or name in used_inputs},
        )
        model = CaffeNet(graph, self.modules, steps, ties)
        log.info("built %s: %d layers run, %d left out", self.net.name or self.path, len(infos), len(self.left_out))
        return model.eval()

    # ------------------------------------------------------------------ inputs

    def _declare_legacy_inputs(self) -> None:
        declared = {top for layer in self.net.layers if layer.type == "Input" for top in layer.tops}
        for name, dims in self.net.inputs.items():
            if name not in declared:
                self._input(name, dims, "net input")

    def _declare_inputs(self, layer: Layer) -> None:
        stated = stated_shapes(layer, self.net.inputs)
        for top in layer.tops:
            self._input(top, stated.get(top, ()), layer.name)

    def _input(self, name: str, dims: Shape, where: str) -> None:
        if name in self.shapes:
            raise self.error(f"input '{name}' is declared twice", layer=where if where != "net input" else None)
        shape = self.overrides.get(name, tuple(dims))
        self.inputs[name] = shape
        self.shapes[name] = shape
        self.producer[name] = where

    def _input_shape(self, name: str, layer: str) -> Shape:
        shape = self.shapes[name]
        if not shape or any(d <= 0 for d in shape):
            raise self.error(f"input '{name}' has no shape in the net; give one with --input-shape {name}=N,C,H,W", layer)
        return shape

    # ------------------------------------------------------------------ layers

    def _add(self, layer: Layer) -> None:
        if not layer.name:
            raise self.error(f"a {layer.type} layer has no name")
        key = layer_key(layer.name)
        repeat = 1
        while key in self.modules:  # Caffe allows repeated layer names (each takes the weights of that name)
            key = f"{layer_key(layer.name)}%23{repeat}"
            repeat += 1
        registration = converter_for(layer, self.path)
        self._check_bottoms(layer)
        for i, top in enumerate(layer.tops):
            in_place = i < len(layer.bottoms) and layer.bottoms[i] == top
            if top in self.shapes and not in_place:
                raise self.error(
                    f"top '{top}' is already produced by '{self.producer[top]}' (only an in-place top, "
                    "top i == bottom i, may reuse a blob name)",
                    layer.name,
                )
        if len(set(layer.tops)) != len(layer.tops):
            raise self.error(f"repeats a top name: {list(layer.tops)}", layer.name)
        bottom_shapes = tuple(
            self._input_shape(b, layer.name) if b in self.inputs else self.shapes[b] for b in layer.bottoms
        )
        names = [spec.name for spec in layer.param.param]
        tied = bool(names) and all(name in self.param_names for name in names)
        self.param_names.update(name for name in names if name)
        spec = LayerSpec(layer=layer, shapes=bottom_shapes, path=self.path, tied=tied, phase=self.phase)
        module = registration.convert(spec)
        if tied and len(getattr(module, "caffe_blobs", ())) > len(names):  # a blob of its own after all
            spec = dataclasses.replace(spec, tied=False)
            module = registration.convert(spec)
        if not isinstance(module, nn.Module):
            raise self.error(f"converter {registration.qualname} returned {type(module).__name__}, not an nn.Module", layer.name)
        top_shapes = self._infer(spec, module)
        self.modules[key] = module
        self.consumed.update(layer.bottoms)
        for top, shape in zip(layer.tops, top_shapes):
            self.shapes[top] = shape
            self.producer[top] = layer.name
        info = LayerInfo(
            name=layer.name,
            key=key,
            type=layer.type,
            bottoms=layer.bottoms,
            tops=layer.tops,
            bottom_shapes=bottom_shapes,
            top_shapes=top_shapes,
            converter=registration.qualname,
            parameters=0,
        )
        self.kept.append((layer, info))

    def _check_bottoms(self, layer: Layer) -> None:
        for bottom in layer.bottoms:
            if bottom not in self.shapes:
                raise self.error(self._missing_bottom(layer, bottom), layer.name)

    def _missing_bottom(self, layer: Layer, bottom: str) -> str:
        later = [other for other in self.net.layers if bottom in other.tops and other is not layer]
        dropped = {entry.name: entry for entry in self.left_out}
        for other in later:
            if other.name in dropped:
                return f"bottom '{bottom}' comes from layer '{other.name}', which is left out ({dropped[other.name].reason})"
        if later:
            cycle = self._depends_on(later[0], set(layer.tops))
            what = "a cycle" if cycle else "layers out of order"
            return f"bottom '{bottom}' is produced only by the later layer '{later[0].name}' ({what}: Caffe runs layers in file order)"
        return f"bottom '{bottom}' is not produced by any layer or input"

    def _depends_on(self, layer: Layer, blobs: set[str]) -> bool:
        """Whether `layer` reads, directly or through other layers, one of `blobs`."""
        producers = {top: other for other in self.net.layers for top in other.tops}
        seen, todo = set(), list(layer.bottoms)
        while todo:
            blob = todo.pop()
            if blob in blobs:
                return True
            if blob in seen or blob not in producers:
                continue
            seen.add(blob)
            todo.extend(b for b in producers[blob].bottoms if b != blob)
        return False

    def _infer(self, spec: LayerSpec, module: nn.Module) -> tuple[Shape, ...]:
        """Top shapes from running `module` on meta tensors (zeros on the CPU where meta is unsupported)."""
        if hasattr(module, "output_shapes"):
            return self._checked(spec, module.output_shapes(*spec.shapes))
        tensors = dict(module.named_parameters()) | dict(module.named_buffers())
        try:
            meta = {name: torch.empty_like(t, device="meta") for name, t in tensors.items()}
            args = tuple(torch.empty(s, device="meta") for s in spec.shapes)
            out = torch.func.functional_call(module, meta, args)
        except NotImplementedError:
            out = self._run_cpu(spec, module)
        except (RuntimeError, ValueError, IndexError, TypeError) as exc:
            raise spec.error(f"cannot run on bottoms {list(spec.shapes)}: {_first_line(exc)}") from None
        outs = (out,) if isinstance(out, torch.Tensor) else tuple(out)
        return self._checked(spec, tuple(t.shape for t in outs))

    @staticmethod
    def _checked(spec: LayerSpec, shapes: Iterable[Iterable[int]]) -> tuple[Shape, ...]:
        result = tuple(tuple(int(d) for d in shape) for shape in shapes)
        if len(result) != len(spec.layer.tops):
            raise spec.error(f"makes {len(result)} blob(s) but has {len(spec.layer.tops)} top(s)")
        for top, shape in zip(spec.layer.tops, result):
            if any(d <= 0 for d in shape):
                raise spec.error(f"top '{top}' would be empty: shape {shape} from bottoms {list(spec.shapes)}")
        return result

    @staticmethod
    def _run_cpu(spec: LayerSpec, module: nn.Module) -> Any:
        try:
            with torch.no_grad():
                return module(*(torch.zeros(s) for s in spec.shapes))
        except (RuntimeError, ValueError, IndexError, TypeError) as exc:
            raise spec.error(f"cannot run on bottoms {list(spec.shapes)}: {_first_line(exc)}") from None

    # ------------------------------------------------------------------ shared parameters

    def _tie_shared(self, has_weights: bool) -> tuple[list[_Tie], dict[str, int]]:
        """Tie `param { name }` blobs to their first user; check copies, shapes and multipliers.

        Returns the ties and, per layer, the number of parameter values it owns.
        """
        owners: dict[str, tuple[Layer, str, int, Any]] = {}
        ties: list[_Tie] = []
        self._shared: dict[str, tuple[SharedParam, ...]] = {}
        owned: dict[str, int] = {}
        for layer, info in self.kept:
            module = self.modules[info.key]
            attrs = tuple(getattr(module, "caffe_blobs", ()))
            specs = list(layer.param.param)
            if len(specs) > len(attrs):
                raise self.error(f"{len(specs)} param entries but the layer has {len(attrs)} blob(s)", layer.name)
            tied_attrs: set[str] = set()
            shared: list[SharedParam] = []
            for index, spec in enumerate(specs):
                if not spec.name:
                    continue
                if spec.name not in owners:
                    owners[spec.name] = (layer, info.key, index, spec)
                    continue
                owner, owner_key, owner_index, owner_spec = owners[spec.name]
                mine = _get(module, attrs[index])
                owner_attr = self.modules[owner_key].caffe_blobs[owner_index]
                theirs = _get(self.modules[owner_key], owner_attr)
                self._check_shared(spec.name, (layer, index, spec, mine), (owner, owner_index, owner_spec, theirs))
                ties.append(_Tie(info.key, attrs[index], owner_key, owner_attr))
                tied_attrs.add(attrs[index])
                shared.append(SharedParam(spec.name, index, owner.name))
            if has_weights and not layer.blobs and len(tied_attrs) < len(attrs):
                raise self.error("the weights hold no blobs for this layer", layer.name)
            owned[info.key] = sum(_get(module, a).numel() for a in attrs if a not in tied_attrs)
            if shared:
                self._shared[info.key] = tuple(shared)
        return ties, owned

    def _check_shared(self, name: str, here: tuple[Layer, int, Any, torch.Tensor], there: tuple[Layer, int, Any, torch.Tensor]) -> None:
        """A shared blob's later use must match its first: shape, lr_mult, decay_mult and the stored copy."""
        layer, index, spec, mine = here
        owner, owner_index, owner_spec, theirs = there
        where = f"shared parameter '{name}' (blob {index}, first used by layer '{owner.name}')"
        if tuple(mine.shape) != tuple(theirs.shape):
            raise self.error(f"{where} has shape {tuple(mine.shape)} here but {tuple(theirs.shape)} there", layer.name)
        for field_name in ("lr_mult", "decay_mult"):
            a, b = getattr(spec, field_name), getattr(owner_spec, field_name)
            if a != b:
                raise self.error(f"{where}: {field_name} {a:g} here but {b:g} there", layer.name)
        if layer.blobs and owner.blobs:
            here = np.ascontiguousarray(layer.blobs[index], dtype=np.float32).reshape(-1)
            there = np.ascontiguousarray(owner.blobs[owner_index], dtype=np.float32).reshape(-1)
            # Byte equality (a memcmp, no temporaries): the copies Caffe saved must be the same bits.
            if here.shape != there.shape or memoryview(here).cast("B") != memoryview(there).cast("B"):
                diff = float(np.max(np.abs(here - there))) if here.shape == there.shape else float("nan")
                raise self.error(f"{where}: the weights' copies differ (max abs difference {diff:g})", layer.name)
            release_pages(layer.blobs[index])  # a checked copy is not read again: its file pages can go

    # ------------------------------------------------------------------ plan

    def _steps(self) -> tuple[Step, ...]:
        """Each kept layer with the blobs whose last read it is (freed after it unless kept)."""
        last_read: dict[str, int] = {}
        for position, (layer, _) in enumerate(self.kept):
            for bottom in layer.bottoms:
                last_read[bottom] = position
        outputs = set(self._outputs())
        frees: dict[int, list[str]] = {}
        for blob, position in last_read.items():
            if blob not in outputs:
                frees.setdefault(position, []).append(blob)
        return tuple(
            Step(info.key, layer.bottoms, layer.tops, tuple(frees.get(position, ())))
            for position, (layer, info) in enumerate(self.kept)
        )

    def _outputs(self) -> tuple[str, ...]:
        """Caffe's net outputs: blobs produced by kept layers (or inputs) that no kept layer reads
        after producing them, in order of production."""
        available: dict[str, None] = {}
        for layer, _ in self.kept:
            for bottom in layer.bottoms:
                available.pop(bottom, None)
            for top in layer.tops:
                available[top] = None
        return tuple(name for name in available if name not in self.silenced)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


__all__ = ["ARCH", "CaffeNet", "Graph", "LayerInfo", "LeftOut", "SharedParam", "build_net", "layer_key", "layer_name"]
