"""Converters for layers that combine or reshape blobs: InnerProduct, Eltwise, Concat, Slice, Split,
Flatten, Reshape, Softmax, ArgMax, Permute, Reduction, Tile (Silence: the graph builder)."""

from __future__ import annotations

import math

from torch import nn

from converter.layers.registry import LayerSpec, register
from models.caffe_layers import EltwiseMax, EltwiseSum
from models.caffe_ops import (
    ArgMax,
    CaffeInnerProduct,
    Concat,
    EltwiseProd,
    Permute,
    Reduction,
    Reshape,
    Slice,
    Softmax,
    Split,
    Tile,
)


def canonical_axis(spec: LayerSpec, axis: int, ndim: int, *, end_inclusive: bool = False) -> int:
    """`axis` in [0, ndim) (or [0, ndim] with end_inclusive), negative counting from the end, as Caffe's CanonicalAxisIndex."""
    limit = ndim + 1 if end_inclusive else ndim
    resolved = axis + ndim if axis < 0 else axis
    spec.check(0 <= resolved < limit, f"axis {axis} is out of range for a {ndim}-D bottom")
    return resolved


@register("InnerProduct")
def inner_product(spec: LayerSpec) -> nn.Module:
    """Fully connected: flatten from `axis` (default 1), weight N x K (K x N with transpose)."""
    spec.bottoms(1)
    spec.tops(1)
    p = spec.param.inner_product_param
    shape = spec.shapes[0]
    axis = canonical_axis(spec, p.axis, len(shape))
    spec.check(p.num_output > 0, f"num_output must be positive, got {p.num_output}")
    module = spec.new(
        CaffeInnerProduct, math.prod(shape[axis:]), p.num_output, axis=axis, bias=p.bias_term, transpose=p.transpose
    )
    return spec.load(module)


@register("Eltwise")
def eltwise(spec: LayerSpec) -> nn.Module:
    """SUM (optional coefficients, summed left to right), PROD, MAX of bottoms of one shape."""
    spec.tops(1)
    spec.check(len(spec.shapes) >= 2, f"Eltwise takes at least 2 bottoms, got {len(spec.shapes)}")
    spec.check(len(set(spec.shapes)) == 1, f"bottoms must share one shape, got {list(spec.shapes)}")
    p = spec.param.eltwise_param
    operation = type(p).EltwiseOp.Name(p.operation)
    coeffs = list(p.coeff)
    spec.check(not coeffs or operation == "SUM", "coeff is only allowed for SUM")
    spec.check(not coeffs or len(coeffs) == len(spec.shapes), f"{len(coeffs)} coeffs for {len(spec.shapes)} bottoms")
    if operation == "SUM":
        return EltwiseSum(coeffs or None)
    return EltwiseProd() if operation == "PROD" else EltwiseMax()


@register("Concat")
def concat(spec: LayerSpec) -> nn.Module:
    """Concatenate along `axis` (or the legacy concat_dim)."""
    spec.tops(1)
    spec.check(len(spec.shapes) >= 1, "Concat needs a bottom")
    p = spec.param.concat_param
    ndim = len(spec.shapes[0])
    axis = canonical_axis(spec, p.axis if p.HasField("axis") or not p.HasField("concat_dim") else p.concat_dim, ndim)
    for shape in spec.shapes:
        same = len(shape) == ndim and all(a == b for i, (a, b) in enumerate(zip(shape, spec.shapes[0])) if i != axis)
        spec.check(same, f"bottoms {list(spec.shapes)} differ outside axis {axis}")
    return Concat(axis)


@register("Slice")
def slice_(spec: LayerSpec) -> nn.Module:
    """Slice along `axis` (or slice_dim) at slice_point, or into equal parts, one per top."""
    spec.bottoms(1)
    p = spec.param.slice_param
    shape = spec.shapes[0]
    axis = canonical_axis(spec, p.axis if p.HasField("axis") or not p.HasField("slice_dim") else p.slice_dim, len(shape))
    tops = len(spec.layer.tops)
    points = list(p.slice_point)
    size = shape[axis]
    if points:
        spec.check(len(points) == tops - 1, f"{len(points)} slice points for {tops} tops")
        edges = [0, *points, size]
        spec.check(all(a < b for a, b in zip(edges, edges[1:])), f"slice points {points} must increase within {size}")
        sizes = [b - a for a, b in zip(edges, edges[1:])]
    else:
        spec.check(tops > 0 and size % tops == 0, f"axis size {size} does not split into {tops} equal parts")
        sizes = [size // tops] * tops
    return Slice(axis, sizes)


@register("Split")
def split(spec: LayerSpec) -> nn.Module:
    """The bottom, once per top (Caffe inserts these itself; explicit ones are accepted too)."""
    spec.bottoms(1)
    return Split(len(spec.layer.tops))


@register("Flatten")
def flatten(spec: LayerSpec) -> nn.Module:
    """Collapse dims axis..end_axis into one."""
    spec.bottoms(1)
    spec.tops(1)
    p = spec.param.flatten_param
    ndim = len(spec.shapes[0])
    start = canonical_axis(spec, p.axis, ndim)
    end = canonical_axis(spec, p.end_axis, ndim)
    spec.check(start <= end, f"axis {p.axis} comes after end_axis {p.end_axis}")
    return Reshape(start, end - start + 1, (-1,))


@register("Reshape")
def reshape(spec: LayerSpec) -> nn.Module:
    """Reshape dims [axis, axis + num_axes) to `shape` (0 copies a dim, one -1 is inferred)."""
    spec.bottoms(1)
    spec.tops(1)
    p = spec.param.reshape_param
    shape = spec.shapes[0]
    axis = canonical_axis(spec, p.axis, len(shape), end_inclusive=True)
    spec.check(p.num_axes >= -1, f"num_axes must be -1 or more, got {p.num_axes}")
    spec.check(p.num_axes == -1 or axis + p.num_axes <= len(shape), f"num_axes {p.num_axes} exceeds shape {shape}")
    dims = list(p.shape.dim)
    spec.check(sum(d == -1 for d in dims) <= 1, "at most one dim may be -1")
    spec.check(all(d >= -1 for d in dims), f"dims must be -1, 0 or positive, got {dims}")
    module = Reshape(axis, p.num_axes, dims)
    spec.check(all(axis + i < len(shape) for i, d in enumerate(dims) if d == 0), f"a 0 dim copies past shape {shape}")
    out = module.output_shape(shape)
    spec.check(math.prod(out) == math.prod(shape), f"cannot reshape {shape} ({math.prod(shape)} values) to {dims}")
    return module


@register("Softmax")
def softmax(spec: LayerSpec) -> nn.Module:
    """Softmax along `axis` (default 1, the channels)."""
    spec.bottoms(1)
    spec.tops(1)
    return Softmax(canonical_axis(spec, spec.param.softmax_param.axis, len(spec.shapes[0])))


@register("ArgMax")
def argmax(spec: LayerSpec) -> nn.Module:
    """Top-k indices (or values) along `axis`; without axis Caffe's (N, 1|2, top_k, 1) form."""
    spec.bottoms(1)
    spec.tops(1)
    p = spec.param.argmax_param
    shape = spec.shapes[0]
    axis = canonical_axis(spec, p.axis, len(shape)) if p.HasField("axis") else None
    span = shape[axis] if axis is not None else math.prod(shape[1:])
    spec.check(1 <= p.top_k <= span, f"top_k {p.top_k} must be between 1 and {span}")
    return ArgMax(p.top_k, p.out_max_val, axis)


@register("Permute")
def permute(spec: LayerSpec) -> nn.Module:
    """SSD's Permute: `order`, with the axes it leaves out appended in their order."""
    spec.bottoms(1)
    spec.tops(1)
    ndim = len(spec.shapes[0])
    order = list(spec.param.permute_param.order)
    spec.check(len(set(order)) == len(order) and all(0 <= d < ndim for d in order), f"bad order {order} for {ndim}-D")
    order += [d for d in range(ndim) if d not in order]
    return Permute(order)


@register("Reduction")
def reduction(spec: LayerSpec) -> nn.Module:
    """SUM, ASUM, SUMSQ or MEAN over all axes from `axis` (default 0: one value), times coeff."""
    spec.bottoms(1)
    spec.tops(1)
    p = spec.param.reduction_param
    axis = canonical_axis(spec, p.axis, len(spec.shapes[0]))
    return Reduction(type(p).ReductionOp.Name(p.operation), axis, p.coeff)


@register("Tile")
def tile(spec: LayerSpec) -> nn.Module:
    """Repeat the block from `axis` on `tiles` times."""
    spec.bottoms(1)
    spec.tops(1)
    p = spec.param.tile_param
    spec.check(p.tiles > 0, f"tiles must be positive, got {p.tiles}")
    return Tile(canonical_axis(spec, p.axis, len(spec.shapes[0])), p.tiles)
