"""PASCAL VOC facts: the 21 class names, the label colour palette, the ignore label, palette PNG writing."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from converter.atomic import write_atomic
from converter.errors import CaffeError

CLASS_NAMES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
NUM_CLASSES = len(CLASS_NAMES)
IGNORE_LABEL = 255  # VOC's object boundaries and "difficult" regions; never scored, never trained on


def voc_palette(size: int = 256) -> np.ndarray:
    """The VOC devkit's `labelcolormap`: (size, 3) uint8 RGB, the bits of the index interleaved into R, G, B."""
    palette = np.zeros((size, 3), dtype=np.uint8)
    for index in range(size):
        code, red, green, blue = index, 0, 0, 0
        for bit in range(8):
            red |= ((code >> 0) & 1) << (7 - bit)
            green |= ((code >> 1) & 1) << (7 - bit)
            blue |= ((code >> 2) & 1) << (7 - bit)
            code >>= 3
        palette[index] = (red, green, blue)
    return palette


PALETTE = voc_palette()


def class_names(num_classes: int) -> list[str]:
    """VOC's names for the first `num_classes` classes, `class_<i>` beyond them (other datasets)."""
    return [CLASS_NAMES[i] if i < NUM_CLASSES else f"class_{i}" for i in range(num_classes)]


def save_label_png(path: str | os.PathLike[str], labels: np.ndarray) -> Path:
    """Write an HxW array of class indices as a palette ("P" mode) PNG in VOC colours, atomically."""
    from PIL import Image

    array = np.asarray(labels)
    if array.ndim != 2 or array.size == 0:
        raise CaffeError(f"a label image must be a non-empty HxW array, got shape {array.shape}", path=path)
    if array.min() < 0 or array.max() > 255:
        raise CaffeError(f"label values must lie in [0, 255], got {array.min()}..{array.max()}", path=path)
    image = Image.fromarray(array.astype(np.uint8))  # "L"; putpalette turns it into "P" keeping the indices
    image.putpalette(PALETTE.reshape(-1).tolist())
    return write_atomic(path, lambda temporary: image.save(temporary, format="PNG"))
