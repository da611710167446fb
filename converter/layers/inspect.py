"""The per-layer table `python -m converter inspect` prints: what the converter will do, before running.

One row per layer of the file (left-out ones say why): name, type, bottoms, tops, output shape
from shape inference, parameter count, and a note wherever Caffe's semantics differ from
PyTorch's defaults (ceil rounding and where it clips, the padded AVE divisor, BatchNorm's
factor and eps, Softmax axis, Eltwise coefficients, Interp sizes, shared parameters, ...).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from torch import nn

from converter.caffe.netdesc import Layer, Net
from converter.layers.data import INPUT_TYPES
from converter.layers.graph import CaffeNet, LayerInfo

Note = Callable[[Layer, LayerInfo, nn.Module], list[str]]


@dataclass(frozen=True)
class Row:
    """One line of the table."""

    name: str
    type: str
    bottoms: str
    tops: str
    shape: str
    parameters: str
    notes: str


def _shape(shape: tuple[int, ...]) -> str:
    return "x".join(str(d) for d in shape)


def _pooling(layer: Layer, info: LayerInfo, module: nn.Module) -> list[str]:
    notes = []
    (_, _, height, width) = info.bottom_shapes[0]
    caffe = module.output_size(height, width)
    floor = tuple(
        (size + 2 * p - k) // s + 1 for size, k, s, p in zip((height, width), module.kernel, module.stride, module.pad)
    )
    unclipped = tuple(
        -(-(size + 2 * p - k) // s) + 1 for size, k, s, p in zip((height, width), module.kernel, module.stride, module.pad)
    )
    if module.ceil and caffe != floor:
        notes.append(f"ceil rounding: {_shape(caffe)} (floor would give {_shape(floor)})")
    if module.ceil and caffe != unclipped:
        notes.append(f"last window dropped (it would start in the padding): {_shape(unclipped)} -> {_shape(caffe)}")
    if module.method == "AVE" and (any(module.pad) or caffe != floor):
        notes.append("AVE divisor counts padded cells up to the padded edge")
    if layer.param.pooling_param.global_pooling:
        notes.append("global pooling")
    if any(2 * p > k for p, k in zip(module.pad, module.kernel)):
        notes.append("pad above half the kernel: explicit padding (PyTorch's pooling refuses it)")
    return notes


def _batch_norm(layer: Layer, info: LayerInfo, module: nn.Module) -> list[str]:
    notes = [f"eps {module.eps:g}"]
    if layer.blobs:
        factor = float(np.asarray(layer.blobs[2]).reshape(-1)[0])
        notes.append("statistics x 0 (factor 0)" if factor == 0 else f"statistics / factor {factor:g}")
    if not module.use_global_stats:
        notes.append("use_global_stats false: batch statistics, biased variance")
    return notes


def _softmax(layer: Layer, info: LayerInfo, module: nn.Module) -> list[str]:
    return [f"over axis {module.axis}"]


def _eltwise(layer: Layer, info: LayerInfo, module: nn.Module) -> list[str]:
    p = layer.param.eltwise_param
    operation = type(p).EltwiseOp.Name(p.operation)
    coeffs = list(p.coeff)
    if coeffs:
        return [f"{operation} with coeff {', '.join(f'{c:g}' for c in coeffs)}, left to right"]
    return [f"{operation}" + (", left to right" if operation == "SUM" else "")]


def _interp(layer: Layer, info: LayerInfo, module: nn.Module) -> list[str]:
    before, after = info.bottom_shapes[0][-2:], info.top_shapes[0][-2:]
    return [f"bilinear, aligned corners: {_shape(before)} -> {_shape(after)} ({module.extra_repr() or 'no factors'})"]


def _convolution(layer: Layer, info: LayerInfo, module: nn.Module) -> list[str]:
    conv = getattr(module, "module", module)
    notes = []
    if max(conv.dilation) > 1:
        notes.append(f"dilation {_shape(conv.dilation)}")
    if conv.groups > 1:
        notes.append("depthwise" if conv.groups == conv.in_channels else f"group {conv.groups}")
    return notes


def _inner_product(layer: Layer, info: LayerInfo, module: nn.Module) -> list[str]:
    notes = [f"flattens from axis {module.axis}"]
    if module.transpose:
        notes.append("weight stored transposed (K x N)")
    return notes


def _lrn(layer: Layer, info: LayerInfo, module: nn.Module) -> list[str]:
    if module.across_channels:
        return [f"across {module.size} channels, k {module.k:g}"]
    return [f"within {module.size}x{module.size}, k unused (Caffe adds 1)"]


NOTES: dict[str, Note] = {
    "Pooling": _pooling,
    "BatchNorm": _batch_norm,
    "Softmax": _softmax,
    "Eltwise": _eltwise,
    "Interp": _interp,
    "Convolution": _convolution,
    "Deconvolution": _convolution,
    "InnerProduct": _inner_product,
    "LRN": _lrn,
    "MVN": lambda layer, info, module: ["eps added after the square root"],
    "Dropout": lambda layer, info, module: ["identity at test time"],
    "ReLU": lambda layer, info, module: [f"negative_slope {module.negative_slope:g}"] if module.negative_slope else [],
}


def inspect_rows(built: CaffeNet, net: Net) -> list[Row]:
    """The table's rows in file order: run layers with shapes and notes, left-out layers with the reason."""
    run = {info.key: info for info in built.graph.layers}
    left_out = {entry.name: entry.reason for entry in built.graph.left_out}
    keys_by_name: dict[str, list[str]] = {}
    for info in built.graph.layers:
        keys_by_name.setdefault(info.name, []).append(info.key)
    inputs = built.graph.inputs
    declared = {top for layer in net.layers if layer.type in INPUT_TYPES for top in layer.tops}
    rows = [
        Row(f"({name})", "input", "", name, _shape(shape), "", "net input (input:/input_shape)")
        for name, shape in inputs.items() if name not in declared
    ]
    for layer in net.layers:
        keys = keys_by_name.get(layer.name, [])
        if layer.type in INPUT_TYPES and layer.name not in left_out:
            used = [top for top in layer.tops if top in inputs]
            unused = [top for top in layer.tops if top not in inputs]
            note = "net input" if used else "input no kept layer reads (not fed)"
            note += f"; not fed: {', '.join(unused)} (no kept layer reads it)" if used and unused else ""
            rows.append(Row(layer.name, layer.type, "", ",".join(layer.tops), " ".join(_shape(inputs[t]) for t in used), "", note))
            continue
        if not keys:
            rows.append(Row(layer.name, layer.type, ",".join(layer.bottoms), ",".join(layer.tops), "", "",
                            f"left out: {left_out.get(layer.name, '')}"))
            continue
        info = run[keys.pop(0)]
        module = built.layers[info.key]
        notes = NOTES.get(layer.type, lambda *_: [])(layer, info, module)
        notes += [f"shares '{s.name}' with {s.owner}" for s in info.shared]
        rows.append(
            Row(
                info.name, info.type, ",".join(info.bottoms), ",".join(info.tops),
                " ".join(_shape(s) for s in info.top_shapes), f"{info.parameters:,}" if info.parameters else "",
                "; ".join(notes),
            )
        )
    return rows


def format_table(rows: list[Row]) -> str:
    """Rows as aligned text columns with a header."""
    header = Row("name", "type", "bottoms", "tops", "output shape", "params", "notes")
    table = [header, *rows]
    fields = [field.name for field in dataclasses.fields(Row)]
    widths = {f: max(len(getattr(r, f)) for r in table) for f in fields[:-1]}
    lines = []
    for row in table:
        cells = [getattr(row, f).ljust(widths[f]) for f in fields[:-1]] + [row.notes]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)
