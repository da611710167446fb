"""Geometry of the DeepLab-v2 Caffe net and the size policy of its multi-scale fusion.

Every spatial size in the net follows from a few layers: conv1 (7x7/2 pad 3), pool1 (3x3/2
pad 1, ceil rounding), the stride-2 1x1 convs of res3a, and the Interp layers of the
multi-scale towers. Sizes are separable, so each function here works on one axis.

The three score maps (full, 0.75 upsampled, 0.5 upsampled) have equal sizes only for some
inputs (e.g. 321 and 513, sizes 32k+1 ... 32k+6); elsewhere Caffe's Eltwise MAX fails. The
policy (used by `DeepLabV2MSC` with `align="pad"`): pad the input at the bottom/right with
zeros to `aligned_size`, run, and crop each score map back to the size Caffe's formulas give
for the unpadded input (`score_size(n)` for the full-resolution maps, `score_size` of the
0.5 input for the raw 0.5 map). The input is mean-subtracted, so zero padding is padding with
the mean, as DeepLab's own evaluation pads images to 513.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from models.caffe_layers import caffe_pool_output_size, conv_output_size
from models.interp import caffe_interp_size

STEM_CONV = {"kernel": 7, "stride": 2, "pad": 3}  # conv1
POOL1 = {"kernel": 3, "stride": 2, "pad": 1}  # pool1, MAX, ceil rounding
STAGE_STRIDES = (1, 2, 1, 1)  # res2..res5, on branch1 and branch2a (the first 1x1 convs)
STAGE_DILATIONS = (1, 1, 2, 4)  # res2..res5, on branch2b (3x3, pad = dilation)
# The release's BGR pixel mean (ImageNet), subtracted by its data layers; padding a
# mean-subtracted input with zeros is padding the picture with this mean.
VOC_MEAN_BGR = (104.008, 116.669, 122.675)

# Interp parameters of the multi-scale net.
DATA_RES075 = {"shrink_factor": 4, "zoom_factor": 3}
DATA_RES05 = {"shrink_factor": 2}
RES075_INTERP = {"zoom_factor": 4, "shrink_factor": 3}
RES05_INTERP = {"zoom_factor": 2}
TEST_ZOOM = {"zoom_factor": 8}  # fc1_interp of the test net


class MSCSizes(NamedTuple):
    """Sizes along one axis of the multi-scale net's blobs, named after Caffe's blobs."""

    data: int
    data_res075: int
    data_res05: int
    full: int  # fc1_voc12
    res075: int  # fc1_voc12_res075
    res075_interp: int  # fc1_voc12_res075_interp
    res05: int  # fc1_voc12_res05
    res05_interp: int  # fc1_voc12_res05_interp


def interp_axis_size(size: int, params: dict[str, Any]) -> int:
    """One axis of `caffe_interp_size` for Interp parameters `params`."""
    return caffe_interp_size(size, size, **params)[0]


def score_size(size: int) -> int:
    """Size of a tower's score map (res3 onwards, incl. the ASPP head) for an input `size`."""
    conv1 = conv_output_size(size, STEM_CONV["kernel"], STEM_CONV["stride"], STEM_CONV["pad"])
    pool1 = caffe_pool_output_size(conv1, POOL1["kernel"], POOL1["stride"], POOL1["pad"])
    size = pool1
    for stride in STAGE_STRIDES:
        size = conv_output_size(size, 1, stride)
    return size


def msc_branch_sizes(size: int) -> MSCSizes:
    """Every multi-scale blob size along one axis for an input `size`, by Caffe's formulas."""
    data_res075 = interp_axis_size(size, DATA_RES075)
    data_res05 = interp_axis_size(size, DATA_RES05)
    res075, res05 = score_size(data_res075), score_size(data_res05)
    return MSCSizes(
        data=size,
        data_res075=data_res075,
        data_res05=data_res05,
        full=score_size(size),
        res075=res075,
        res075_interp=interp_axis_size(res075, RES075_INTERP),
        res05=res05,
        res05_interp=interp_axis_size(res05, RES05_INTERP),
    )


def is_aligned(size: int) -> bool:
    """Whether the three fused score maps have equal sizes along an axis of `size`."""
    sizes = msc_branch_sizes(size)
    return sizes.full == sizes.res075_interp == sizes.res05_interp


def aligned_size(size: int) -> int:
    """The smallest size >= `size` at which the multi-scale fusion aligns (always < size + 32)."""
    while not is_aligned(size):
        size += 1
    return size


def prediction_input_size(size: int) -> int:
    """The smallest aligned size >= `size` whose zoomed (x8) fused map covers `size` pixels.

    Sizes 32k+2 .. 32k+6 align, but zoom x8 of their score map gives only 32k+1 pixels, so
    prediction pads those further (to 32k+33).
    """
    padded = aligned_size(size)
    while interp_axis_size(score_size(padded), TEST_ZOOM) < size:
        padded = aligned_size(padded + 1)
    return padded


def misalignment_message(height: int, width: int) -> str:
    """Why an input of `height` x `width` cannot be fused, naming the three map sizes like Caffe would."""
    rows, cols = msc_branch_sizes(height), msc_branch_sizes(width)
    return (
        f"input {height}x{width}: score maps fc1_voc12 {rows.full}x{cols.full}, "
        f"fc1_voc12_res075_interp {rows.res075_interp}x{cols.res075_interp}, "
        f"fc1_voc12_res05_interp {rows.res05_interp}x{cols.res05_interp} differ, so Eltwise MAX "
        f"(fc_fusion) cannot fuse them (Caffe fails here too); use align='pad' or an input of "
        f"{aligned_size(height)}x{aligned_size(width)}"
    )
