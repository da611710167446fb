"""Layer parameters read as Caffe reads them, with Caffe's defaults: one home for each rule.

Every function takes a layer's LayerParameter message (or a `netdesc.Layer`, whose `param` it
reads), so readers, converters and the verifier agree on BatchNorm's eps and moving-average
factor, on the kernel/stride/pad/dilation forms, and on the Interp parameters.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from converter.caffe.netdesc import Layer
from converter.errors import CaffeError

DEFAULT_BN_EPS = 1e-5  # Caffe's BatchNormParameter.eps default (caffe.proto)

# InterpParameter fields under the names `models.interp.caffe_interp_size` takes, with Caffe's defaults.
INTERP_DEFAULTS: dict[str, int] = {
    "zoom_factor": 1,
    "shrink_factor": 1,
    "pad_beg": 0,
    "pad_end": 0,
    "out_height": 0,
    "out_width": 0,
}


def _message(layer: Layer | Any) -> Any:
    """The LayerParameter of a `netdesc.Layer`, or the message itself (whose own `param` field is ParamSpecs)."""
    return layer.param if isinstance(layer, Layer) else layer


def bn_eps(layer: Any, path: str | None = None) -> float:
    """A BatchNorm layer's eps in its shortest decimal form: the field is a float32, so 1e-05 stays
    1e-05 rather than 9.99e-06; unset, Caffe's default. CaffeError (naming `path` and the layer)
    unless it is finite and > 0: (x - mean) / sqrt(var + eps) needs var + eps > 0 for every var >= 0."""
    eps = float(str(np.float32(_message(layer).batch_norm_param.eps)))
    if not math.isfinite(eps) or eps <= 0:
        raise CaffeError(f"BatchNorm eps is {eps:g}; it must be finite and > 0", path=path, layer=_message(layer).name)
    return eps


def bn_statistics(
    mean: np.ndarray, var: np.ndarray, factor: np.ndarray, *, path: str | None = None, layer: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """BatchNorm's usable mean and variance: Caffe stores them times the moving-average factor s
    (its third blob) and uses 1/s, except that s == 0 means the statistics are zero.

    The one validation of these derived values: s must be finite and >= 0, and the statistics
    after the division finite with var >= 0 (a factor of 1e-45 overflows them to inf); a
    CaffeError names `path` and `layer` otherwise.
    """
    s = np.float32(np.asarray(factor).reshape(-1)[0])
    if not np.isfinite(s) or s < 0:
        raise CaffeError(f"BatchNorm moving-average factor is {float(s):g}; it must be finite and >= 0",
                         path=path, layer=layer)
    with np.errstate(over="ignore", invalid="ignore"):
        scale = np.float32(0.0) if s == 0 else np.float32(1.0) / s
        mean_out = (mean * scale).astype(np.float32, copy=False)
        var_out = (var * scale).astype(np.float32, copy=False)
    if not (np.isfinite(mean_out).all() and np.isfinite(var_out).all()):
        raise CaffeError(f"BatchNorm statistics divided by the moving-average factor {float(s):g} are not finite",
                         path=path, layer=layer)
    if (var_out < 0).any():
        raise CaffeError("BatchNorm variance is negative", path=path, layer=layer)
    return mean_out, var_out


def axis_pair(param: Any, name: str, default: int) -> tuple[int, int]:
    """(h, w) of a Convolution/Pooling geometry field `name` (kernel_size, stride, pad, dilation).

    `<name>_h`/`<name>_w` win when either is set (kernel_size's are kernel_h/kernel_w); else the
    field itself: a scalar (PoolingParameter), or 0, 1 or 2 repeated values (ConvolutionParameter:
    none = `default`, one = both axes, two = h then w). More than two is a 3-D net: CaffeError.
    """
    base = "kernel" if name == "kernel_size" else name
    h_field, w_field = f"{base}_h", f"{base}_w"
    fields = param.DESCRIPTOR.fields_by_name
    if h_field in fields and (param.HasField(h_field) or param.HasField(w_field)):
        return getattr(param, h_field), getattr(param, w_field)
    value = getattr(param, name)
    if not isinstance(value, int):  # a repeated field
        values = list(value)
        if len(values) > 2:
            raise CaffeError(f"{name} has {len(values)} values; only 2-D (one or two values) is supported")
        return (default, default) if not values else (values[0], values[-1])
    return (value, value) if param.HasField(name) else (default, default)


def interp_params(layer: Any) -> dict[str, int]:
    """An Interp layer's parameters under `INTERP_DEFAULTS`' names (height/width as out_height/out_width)."""
    p = _message(layer).interp_param
    return {
        "zoom_factor": p.zoom_factor,
        "shrink_factor": p.shrink_factor,
        "pad_beg": p.pad_beg,
        "pad_end": p.pad_end,
        "out_height": p.height,
        "out_width": p.width,
    }
