"""The input every reference producer and the verifier feed: a deterministic synthetic picture or a real
one, preprocessed as Caffe's data layer does (BGR, float32, minus the mean, NCHW, padded with the mean).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from converter.errors import CaffeError
from models.alignment import VOC_MEAN_BGR

# The largest input the verifier feeds: 3 x 8192 x 8192 float32 (768 MiB). A net or reference that
# declares more (a typo, a forged file) is refused before anything is allocated.
MAX_INPUT_ELEMENTS = 3 * 8192 * 8192


def check_input_size(shape: tuple[int, ...], path: str | Path, what: str) -> None:
    """CaffeError naming `path` when an input of `shape` has a non-positive axis or exceeds MAX_INPUT_ELEMENTS."""
    dims = tuple(int(d) for d in shape)
    if not dims or min(dims) < 1:
        raise CaffeError(f"{what} has shape {dims}: every axis must be at least 1", path=path)
    if np.prod(dims, dtype=object) > MAX_INPUT_ELEMENTS:
        raise CaffeError(f"{what} has shape {dims}, more than the {MAX_INPUT_ELEMENTS} values (3x8192x8192) "
                         "the verifier feeds", path=path)



def synthetic_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A deterministic HxWx3 uint8 BGR picture: smooth shading, sharp-edged shapes and fine texture.

    Only numpy's seeded generator and elementwise arithmetic (no libm transcendental functions,
    whose last bits vary between machines), so every machine draws the same pixels. Its statistics
    are close enough to a photograph's that activations deep in a net are neither all zero nor saturated.
    """
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    rng = np.random.default_rng(seed)
    # Smooth structures: a coarse and a finer random colour field, bilinearly upsampled.
    image = 120.0 + _smooth_field(rng, height, width, cells=3, amplitude=70.0)
    image += _smooth_field(rng, height, width, cells=9, amplitude=25.0)
    # Edges: flat-coloured rectangles and ellipses with hard borders, placed relative to the size.
    y = np.linspace(0.0, 1.0, height)[:, None, None]
    x = np.linspace(0.0, 1.0, width)[None, :, None]
    for _ in range(6):
        colour = rng.uniform(0, 255, size=3)
        cy, cx = rng.uniform(0, 1, size=2)
        ry, rx = rng.uniform(0.05, 0.25, size=2)
        if rng.random() < 0.5:
            mask = (np.abs(y - cy) < ry) & (np.abs(x - cx) < rx)
        else:
            mask = ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 < 1.0
        image = np.where(mask, 0.3 * image + 0.7 * colour, image)
    # Texture: pixel noise, correlated over a few pixels by averaging shifted copies.
    noise = rng.uniform(-20.0, 20.0, size=(height + 2, width + 2, 3))
    texture = sum(noise[i : i + height, j : j + width] for i in range(3) for j in range(3)) / 3.0
    return np.clip(np.rint(image + texture), 0, 255).astype(np.uint8)


def _smooth_field(rng: np.random.Generator, height: int, width: int, cells: int, amplitude: float) -> np.ndarray:
    """A (cells+1)^2 grid of random colours in [-amplitude, amplitude], bilinearly stretched to HxWx3."""
    grid = rng.uniform(-amplitude, amplitude, size=(cells + 1, cells + 1, 3))

    def axis(n: int) -> tuple[np.ndarray, np.ndarray]:
        pos = np.linspace(0.0, cells, n)
        low = np.minimum(pos.astype(np.int64), cells - 1)
        return low, pos - low

    y0, fy = axis(height)
    x0, fx = axis(width)
    fy, fx = fy[:, None, None], fx[None, :, None]
    top = grid[y0][:, x0] * (1 - fx) + grid[y0][:, x0 + 1] * fx
    bottom = grid[y0 + 1][:, x0] * (1 - fx) + grid[y0 + 1][:, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


def load_image(path: str | Path) -> np.ndarray:
    """A picture file as HxWx3 uint8 BGR (OpenCV's colour loader; grey pictures get three channels)."""
    path = Path(path)
    if not path.is_file():
        raise CaffeError("no such image file", path=path)
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise CaffeError("OpenCV cannot read this file as an image", path=path)
    return image


def caffe_preprocess(
    image_bgr: np.ndarray,
    mean: tuple[float, float, float] = VOC_MEAN_BGR,
    pad_to: tuple[int, int] | None = None,
    scale: float = 1.0,
) -> np.ndarray:
    """A BGR HxWx3 picture as Caffe's data layer feeds it: (pixel - mean) * scale, shape 1x3xHxW float32.

    `pad_to` (H, W) pads at the bottom and right with the mean, i.e. with zeros after the subtraction,
    as DeepLab's test data layer pads every image to 513x513.
    """
    image = np.asarray(image_bgr)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 BGR image, got shape {image.shape}")
    blob = (image.astype(np.float32) - np.asarray(mean, dtype=np.float32)) * np.float32(scale)
    blob = np.ascontiguousarray(blob.transpose(2, 0, 1)[None])
    if pad_to is None:
        return blob
    height, width = image.shape[:2]
    out_h, out_w = int(pad_to[0]), int(pad_to[1])
    if out_h < height or out_w < width:
        raise CaffeError(f"image {height}x{width} is larger than the pad size {out_h}x{out_w}")
    padded = np.zeros((1, 3, out_h, out_w), dtype=np.float32)
    padded[:, :, :height, :width] = blob
    return padded
