"""Capture the PyTorch value of Caffe blobs in one forward pass, through forward hooks.

`converter.deeplab.names` names, for every Caffe blob, the module whose forward output equals the
blob's final value (in-place BatchNorm/Scale/ReLU included) and, in the multi-scale model,
which call of that shared module belongs to which tower. A hook keeps only the blobs asked
for, detached and uncloned: the model writes in place only into tensors it has just made
(ReLU after BatchNorm, ReLU after the residual sum), never into a tapped output, and the
version counter of every kept tensor is checked after the pass to prove it. A caller can
instead consume each blob in the hook (`on_blob`) and keep nothing. Tails the model does not
run (the test net's `fc1_interp`, Interp zoom 8 of the fused map) are computed from their
bottom when the reference's net definition has them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import torch
from torch import nn

from converter.caffe.params import INTERP_DEFAULTS, interp_params
from converter.caffe.prototxt import parse_prototxt_text
from converter.deeplab.names import TOWER_SUFFIXES, caffe_blob_taps, caffe_msc_blob_taps, detect_head_name
from models.deeplab import ResNetConfig
from models.interp import caffe_interp, caffe_interp_size

# Blobs only the multi-scale net has (besides the tower copies, which carry these suffixes).
MSC_ONLY = ("data_res075", "data_res05", "fc_fusion")

BlobSink = Callable[[str, torch.Tensor], None]


@dataclass(frozen=True)
class Tap:
    """Blob value = output of the `call`-th call (0-based, per forward pass) of module `module`."""

    module: str
    call: int = 0


@dataclass(frozen=True)
class InterpTail:
    """A Caffe Interp layer after the mapped blobs (e.g. fc1_interp): blob = Interp(`bottom`)."""

    bottom: str
    params: Mapping[str, int]

    def describe(self) -> str:
        """The parameters that are set, e.g. "zoom_factor=8"."""
        return ", ".join(f"{key}={value}" for key, value in self.params.items() if value != INTERP_DEFAULTS[key])

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        pads = {k: self.params.get(k, 0) for k in ("pad_beg", "pad_end")}
        height, width = caffe_interp_size(x.shape[-2], x.shape[-1], **self.params)
        return caffe_interp(x, height, width, **pads)


@dataclass(frozen=True)
class BlobMap:
    """Which Caffe blobs the PyTorch model produces, and how: hooked taps and computed Interp tails."""

    multi_scale: bool
    head_name: str
    taps: Mapping[str, Tap]
    tails: Mapping[str, InterpTail]

    def __contains__(self, name: object) -> bool:
        return name in self.taps or name in self.tails

    def is_head(self, name: str) -> bool:
        """Whether the blob comes from the classifier head (ASPP, its upsampling, fusion, tails)."""
        if name in self.tails:
            return self.is_head(self.tails[name].bottom)
        module = self.taps[name].module
        return module == "aspp" or module.startswith("aspp.") or module in _HEAD_STEPS


_HEAD_STEPS = ("fc1_voc12_res075_interp", "fc1_voc12_res05_interp", "fc_fusion")


def blob_map(config: ResNetConfig, reference_names: Iterable[str], prototxt: str = "") -> BlobMap:
    """The DeepLab-v2 map for a reference: multi-scale when it holds any multi-scale blob, with its
    head name (fc1_voc12 when it holds no head blob), the taps `converter.deeplab.names` gives for
    that net, plus the Interp tails its net definition (`prototxt` text) applies to mapped blobs."""
    names = list(reference_names)
    head_name = detect_head_name(names)
    multi_scale = any(n in MSC_ONLY or n.endswith(TOWER_SUFFIXES) for n in names)
    if multi_scale:
        taps = {name: Tap(path, call) for name, (path, call) in caffe_msc_blob_taps(config, head_name).items()}
    else:
        taps = {name: Tap(path) for name, path in caffe_blob_taps(config, head_name).items()}
    return tap_map(taps, multi_scale=multi_scale, head_name=head_name, prototxt=prototxt)


def tap_map(taps: Mapping[str, Tap], *, multi_scale: bool, head_name: str, prototxt: str = "") -> BlobMap:
    """The map of any model's blob taps, plus the Interp tails the net text applies to tapped blobs."""
    tails = _interp_tails(prototxt, taps) if prototxt else {}
    return BlobMap(multi_scale, head_name, dict(taps), tails)


def _interp_tails(prototxt: str, taps: Mapping[str, Tap]) -> dict[str, InterpTail]:
    """Interp layers of the net text whose bottom is a mapped blob and whose top is not."""
    tails: dict[str, InterpTail] = {}
    for layer in parse_prototxt_text(prototxt, path="<reference prototxt>").layer:
        if layer.type != "Interp" or len(layer.bottom) != 1 or len(layer.top) != 1:
            continue
        bottom, top = layer.bottom[0], layer.top[0]
        if top in taps or (bottom not in taps and bottom not in tails):
            continue
        tails[top] = InterpTail(bottom, interp_params(layer))
    return tails


@torch.no_grad()
def capture_blobs(
    model: nn.Module,
    data: torch.Tensor,
    blobs: BlobMap,
    names: Iterable[str],
    on_blob: BlobSink | None = None,
) -> dict[str, torch.Tensor]:
    """Run `model(data)` once and return the value of each named blob (or hand each to `on_blob`).

    Kept values are the model's own output tensors, detached, in the model's dtype and device.
    With `on_blob` nothing is kept (the returned dict is empty): each blob is handed over
    as soon as its module has run, so a caller can reduce it and let it go.
    """
    wanted = list(dict.fromkeys(names))
    unknown = [n for n in wanted if n not in blobs]
    if unknown:
        raise KeyError(f"blobs with no PyTorch counterpart: {', '.join(unknown)}")
    kept: dict[str, torch.Tensor] = {}
    versions: dict[str, int] = {}

    def emit(name: str, value: torch.Tensor) -> None:
        if on_blob is not None:
            on_blob(name, value)
        else:
            kept[name] = value
            versions[name] = value._version

    emitters = _emitters(blobs, wanted, emit)
    calls: dict[str, int] = {}
    handles = []
    for path in {tap_path for tap_path, _ in emitters}:

        def hook(module: nn.Module, args: object, output: torch.Tensor, path: str = path) -> None:
            call = calls.get(path, 0)
            calls[path] = call + 1
            for emitter in emitters.get((path, call), ()):
                emitter(output.detach())

        handles.append(model.get_submodule(path).register_forward_hook(hook))
    try:
        model(data)
    finally:
        for handle in handles:
            handle.remove()
    missed = [f"{path} call {call}" for path, call in emitters if calls.get(path, 0) <= call]
    if missed:
        raise RuntimeError(f"tapped modules did not run as mapped: {', '.join(missed)}")
    changed = [name for name, value in kept.items() if value._version != versions[name]]
    if changed:
        raise RuntimeError(f"the model wrote in place into captured blobs after their module ran: {', '.join(changed)}")
    return kept


def _emitters(
    blobs: BlobMap, wanted: list[str], emit: BlobSink
) -> dict[tuple[str, int], list[Callable[[torch.Tensor], None]]]:
    """(module path, call) -> functions to run on that call's output: emit a blob, or a tail computed from it."""
    emitters: dict[tuple[str, int], list[Callable[[torch.Tensor], None]]] = {}

    def add(name: str, then: Callable[[torch.Tensor], None]) -> None:
        if name in blobs.tails:
            tail = blobs.tails[name]
            add(tail.bottom, lambda x: then(tail.apply(x)))
        else:
            tap = blobs.taps[name]
            emitters.setdefault((tap.module, tap.call), []).append(then)

    for name in wanted:
        add(name, lambda value, name=name: emit(name, value))
    return emitters
