"""The DeepLab Caffe fork's Interp layer: its output-size rules and its bilinear resize.

Caffe's `InterpLayer` first trims the input by `pad_beg`/`pad_end` (negative values crop),
then picks the output size from whichever parameters are set, and resizes with bilinear
interpolation whose corner pixels map onto corner pixels (PyTorch's `align_corners=True`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _interp_axis(size: int, zoom_factor: int, shrink_factor: int, out_size: int) -> int:
    """One axis of Caffe's Interp output size, `size` already including the pads."""
    if shrink_factor != 1 and zoom_factor == 1:
        return (size - 1) // shrink_factor + 1
    if zoom_factor != 1 and shrink_factor == 1:
        return size + (size - 1) * (zoom_factor - 1)
    if out_size:
        return out_size
    shrunk = (size - 1) // shrink_factor + 1
    return shrunk + (shrunk - 1) * (zoom_factor - 1)


def caffe_interp_size(
    height: int,
    width: int,
    *,
    zoom_factor: int = 1,
    shrink_factor: int = 1,
    pad_beg: int = 0,
    pad_end: int = 0,
    out_height: int = 0,
    out_width: int = 0,
) -> tuple[int, int]:
    """Output (height, width) of Caffe's Interp layer for an input of `height` x `width`.

    With H' = H + pad_beg + pad_end, in Caffe's order of precedence: shrink only
    (H'-1)//s + 1; zoom only H' + (H'-1)(z-1); explicit `out_height`/`out_width`: those;
    shrink and zoom: shrink, then zoom. A factor of 1 counts as unset (its formula is the
    identity, so only its precedence over an explicit size could differ from Caffe's
    `has_*` test); with no factor and no explicit size the result is H' itself.
    """
    if zoom_factor < 1 or shrink_factor < 1:
        raise ValueError(f"Interp factors must be >= 1, got zoom {zoom_factor}, shrink {shrink_factor}")
    if bool(out_height) != bool(out_width) or out_height < 0 or out_width < 0:
        raise ValueError(f"Interp needs both a positive height and width, got {out_height} x {out_width}")
    eff_height, eff_width = height + pad_beg + pad_end, width + pad_beg + pad_end
    if eff_height < 1 or eff_width < 1:
        raise ValueError(
            f"Interp input {height} x {width} with pads {pad_beg}/{pad_end} leaves {eff_height} x {eff_width}"
        )
    return (
        _interp_axis(eff_height, zoom_factor, shrink_factor, out_height),
        _interp_axis(eff_width, zoom_factor, shrink_factor, out_width),
    )


def caffe_interp(x: torch.Tensor, out_height: int, out_width: int, *, pad_beg: int = 0, pad_end: int = 0) -> torch.Tensor:
    """Resize N,C,H,W `x` to `out_height` x `out_width` as Caffe's Interp does.

    Pads apply to both spatial axes before the resize: negative pads crop (the only kind the
    fork accepts), positive pads add zeros. Bilinear with aligned corners: output pixel i
    samples input position i * (H'-1)/(H_out-1), the same float arithmetic as the fork's
    `caffe_cpu_interp2`; an output of size 1 samples position 0.
    """
    if pad_beg or pad_end:
        x = F.pad(x, (pad_beg, pad_end, pad_beg, pad_end))
    return F.interpolate(x, size=(out_height, out_width), mode="bilinear", align_corners=True)


class CaffeInterp(nn.Module):
    """A Caffe Interp layer with fixed parameters; the output size follows the input size."""

    def __init__(
        self,
        *,
        zoom_factor: int = 1,
        shrink_factor: int = 1,
        pad_beg: int = 0,
        pad_end: int = 0,
        height: int = 0,
        width: int = 0,
    ) -> None:
        super().__init__()
        self.zoom_factor = zoom_factor
        self.shrink_factor = shrink_factor
        self.pad_beg = pad_beg
        self.pad_end = pad_end
        self.height = height
        self.width = width
        self.output_size(1 << 16, 1 << 16)  # reject bad factors or a half-given size now, not at forward

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """The output (height, width) for an input of `height` x `width`."""
        return caffe_interp_size(
            height,
            width,
            zoom_factor=self.zoom_factor,
            shrink_factor=self.shrink_factor,
            pad_beg=self.pad_beg,
            pad_end=self.pad_end,
            out_height=self.height,
            out_width=self.width,
        )

    def output_shapes(self, shape: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
        """The output shape for an input of `shape` (the layer registry's shape inference)."""
        return ((*shape[:-2], *self.output_size(shape[-2], shape[-1])),)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out_height, out_width = self.output_size(x.shape[-2], x.shape[-1])
        return caffe_interp(x, out_height, out_width, pad_beg=self.pad_beg, pad_end=self.pad_end)

    def extra_repr(self) -> str:
        fields = ("zoom_factor", "shrink_factor", "pad_beg", "pad_end", "height", "width")
        defaults = (1, 1, 0, 0, 0, 0)
        return ", ".join(f"{f}={getattr(self, f)}" for f, d in zip(fields, defaults) if getattr(self, f) != d)
