"""The DeepLab-v2 fork's training data transform (`ImageSegData` + `DataTransformer::TransformImgAndSeg`).

Facts below are from the fork's `src/caffe/data_transformer.cpp` (TransformImgAndSeg) and
`src/caffe/layers/image_seg_data_layer.cpp` (load_batch), as read in the deeplab-public-ver2 sources
(copies in the public code index, e.g. ferasha/deeplab-public-ver2 @ 6639b17):

- Random draws, in this order per image: mirror `param.mirror() && Rand(2)` FIRST (only when mirror
  is on), then the scale index `Rand(scale_factors.size())` (only when factors are given), then the
  crop offsets `h_off = Rand(H - crop_h + 1)` and THEN `w_off = Rand(W - crop_w + 1)` (TRAIN only;
  TEST takes the centre `(H - crop_h) / 2`, `(W - crop_w) / 2`).
- Scaling: `img_height *= scale` on an int with a float factor: the new size is the float32 product
  truncated (floor for positive sizes). The image is resized with `cv::resize(..., INTER_LINEAR)`, the
  label with `INTER_NEAREST`, both to that size; a factor of exactly 1 skips the resize.
- Padding: after scaling, if smaller than the crop, the image is padded at the BOTTOM and RIGHT only
  (`copyMakeBorder(0, pad_h, 0, pad_w)`) with the mean values (so the padded pixels become 0 after
  mean subtraction), the label with `ignore_label`.
- Crop: a window of the padded image, the same window of the label.
- Mirror is applied last, to the cropped window, while copying out (`data_width - 1 - w`).
- Output: `(pixel - mean[c]) * scale` with `scale = transform_param.scale` (default 1), CHW float.

Caffe's RNG (boost mt19937 `% n`) is not reproduced: draws come from a numpy Generator the caller
seeds per sample and update (see segmentation.train), in Caffe's order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import cv2
import numpy as np

from converter.errors import CaffeError
from models.alignment import VOC_MEAN_BGR
from segmentation.voc import IGNORE_LABEL

# The official VOC12 data layer (DeepLab-v2 release train.prototxt).
DEFAULT_CROP = 321
DEFAULT_SCALE_FACTORS = (0.5, 0.75, 1.0, 1.25, 1.5)
# Crops where the three fused score maps align and Interp's label shrink by 8 and by 16 samples every
# 8th / 16th pixel exactly (its ratio (crop-1)/(out-1) is an integer): crop = 32k + 1.
CROP_STEP = 32


def valid_crops(around: int, count: int = 3) -> list[int]:
    """Crop sizes 32k+1 near `around` (for error messages)."""
    k = max(1, round((around - 1) / CROP_STEP))
    return [CROP_STEP * j + 1 for j in range(max(1, k - 1), max(1, k - 1) + count)]


def check_crop(height: int, width: int) -> None:
    """Refuse crops where the label shrink would blend labels and the score maps misalign (not 32k+1)."""
    for size in (height, width):
        if size < CROP_STEP + 1 or (size - 1) % CROP_STEP:
            raise CaffeError(
                f"crop {height}x{width}: every crop side must be 32k+1 (e.g. {', '.join(map(str, valid_crops(size)))}), "
                "where the fused score maps align and the label shrinks by 8 and 16 sample pixels exactly "
                "(at other sizes Caffe's Interp blends label values)"
            )


@dataclass(frozen=True)
class TransformParams:
    """The data layer's transform_param: crop, mirror, BGR mean, random scale factors, value scale."""

    crop_height: int = DEFAULT_CROP
    crop_width: int = DEFAULT_CROP
    mirror: bool = True
    mean_bgr: tuple[float, float, float] = VOC_MEAN_BGR
    scale_factors: tuple[float, ...] = field(default=DEFAULT_SCALE_FACTORS)
    value_scale: float = 1.0  # transform_param.scale
    ignore_label: int = IGNORE_LABEL

    def __post_init__(self) -> None:
        check_crop(self.crop_height, self.crop_width)
        if len(self.mean_bgr) != 3:
            raise CaffeError(f"mean_bgr needs 3 values (B, G, R), got {list(self.mean_bgr)}")
        if any(not factor > 0 for factor in self.scale_factors):
            raise CaffeError(f"scale factors must be positive, got {list(self.scale_factors)}")


class Draw(NamedTuple):
    """The random choices for one image, in the order Caffe makes them."""

    mirror: bool
    scale: float
    h_off: int
    w_off: int


def scaled_size(height: int, width: int, scale: float) -> tuple[int, int]:
    """Caffe's `img_height *= scale`: the float32 product truncated to int."""
    factor = np.float32(scale)
    return int(np.float32(height) * factor), int(np.float32(width) * factor)


def padded_size(height: int, width: int, params: TransformParams) -> tuple[int, int]:
    """Size after padding bottom/right up to the crop (never smaller than the input)."""
    return max(height, params.crop_height), max(width, params.crop_width)


def draw(rng: np.random.Generator, height: int, width: int, params: TransformParams, *, train: bool = True) -> Draw:
    """Draw mirror, scale, then crop offsets for an image of `height` x `width`, in Caffe's order."""
    mirror = bool(params.mirror and rng.integers(2))
    scale = 1.0
    if params.scale_factors:
        scale = float(params.scale_factors[int(rng.integers(len(params.scale_factors)))])
    scaled_h, scaled_w = (height, width) if scale == 1 else scaled_size(height, width, scale)
    padded_h, padded_w = padded_size(scaled_h, scaled_w, params)
    if train:
        h_off = int(rng.integers(padded_h - params.crop_height + 1))
        w_off = int(rng.integers(padded_w - params.crop_width + 1))
    else:
        h_off = (padded_h - params.crop_height) // 2
        w_off = (padded_w - params.crop_width) // 2
    return Draw(mirror, scale, h_off, w_off)


def apply(image: np.ndarray, label: np.ndarray, choice: Draw, params: TransformParams) -> tuple[np.ndarray, np.ndarray]:
    """Scale, pad, crop, mirror and mean-subtract: (3, crop_h, crop_w) float32 BGR data and (crop_h, crop_w) uint8 label."""
    if image.shape[:2] != label.shape[:2]:
        raise CaffeError(f"image {image.shape[:2]} and label {label.shape[:2]} differ in size")
    if choice.scale != 1:
        height, width = scaled_size(image.shape[0], image.shape[1], choice.scale)
        if height < 1 or width < 1:
            raise CaffeError(f"image {image.shape[1]}x{image.shape[0]} scaled by {choice.scale} is empty")
        image = cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)
        label = cv2.resize(label, (width, height), interpolation=cv2.INTER_NEAREST)
    # Padding bottom/right, then the crop window: only the window is built. Its part inside the
    # image is copied; the rest is padding (the mean, 0 after subtraction; the label's ignore value).
    height, width = image.shape[:2]
    padded_h, padded_w = padded_size(height, width, params)
    if not (0 <= choice.h_off <= padded_h - params.crop_height and 0 <= choice.w_off <= padded_w - params.crop_width):
        raise CaffeError(f"crop offset ({choice.h_off}, {choice.w_off}) outside the padded {padded_w}x{padded_h} image")
    mean = np.asarray(params.mean_bgr, dtype=np.float32)
    data = np.empty((params.crop_height, params.crop_width, 3), dtype=np.float32)
    data[...] = mean
    out_label = np.full((params.crop_height, params.crop_width), params.ignore_label, dtype=np.uint8)
    inside_h = max(0, min(height - choice.h_off, params.crop_height))
    inside_w = max(0, min(width - choice.w_off, params.crop_width))
    rows = slice(choice.h_off, choice.h_off + inside_h)
    cols = slice(choice.w_off, choice.w_off + inside_w)
    data[:inside_h, :inside_w] = image[rows, cols]
    out_label[:inside_h, :inside_w] = label[rows, cols]
    if choice.mirror:
        data, out_label = data[:, ::-1], out_label[:, ::-1]
    data = (data - mean) * np.float32(params.value_scale)
    return np.ascontiguousarray(data.transpose(2, 0, 1)), np.ascontiguousarray(out_label)


def transform(
    image: np.ndarray, label: np.ndarray, params: TransformParams, rng: np.random.Generator, *, train: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """One `TransformImgAndSeg` call: draw (in Caffe's order) and apply."""
    choice = draw(rng, image.shape[0], image.shape[1], params, train=train)
    return apply(image, label, choice, params)
