"""VOC-layout datasets: list files (both formats), images read as Caffe reads them, index labels, checks.

Shared by training and evaluation. Images are read with OpenCV's colour loader (BGR uint8, as Caffe's
ImageSegData does); labels with Pillow, as the indices a palette or grayscale PNG stores, never its colours
(OpenCV's loader would return the palette colours: a known mistake of the earlier port).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from converter.errors import CaffeError, listed
from segmentation.voc import IGNORE_LABEL


@dataclass(frozen=True)
class Sample:
    """One listed image and its label file (None where the list gives no label)."""

    id: str  # image stem, e.g. "2007_000032"
    image: Path
    label: Path | None


def _under_root(root: Path, listed_path: str) -> Path:
    """DeepLab's lists write paths relative to the data root with a leading '/'."""
    return root / listed_path.lstrip("/")


def read_list(
    list_path: str | os.PathLike[str],
    root: str | os.PathLike[str],
    *,
    image_dir: str = "JPEGImages",
    label_dir: str = "SegmentationClassAug",
    image_ext: str = ".jpg",
    label_ext: str = ".png",
    labels: bool = True,
) -> list[Sample]:
    """The samples of a list file: `/JPEGImages/x.jpg /SegmentationClassAug/x.png` lines or bare ids `x`.

    A line holding a path (it contains '/') is DeepLab's format, relative to `root`; one path alone means no
    label. A line without '/' is an id resolved as `root/image_dir/<id><image_ext>` and the same for labels.
    With `labels=False` label paths are ignored. Every file is checked; all missing ones are reported in one error.
    """
    list_file = Path(list_path)
    data_root = Path(root)
    try:
        lines = list_file.read_text().splitlines()
    except OSError as error:
        raise CaffeError(f"cannot read the list file: {error.strerror or error}", path=list_file) from None
    except UnicodeDecodeError:
        raise CaffeError("not a text list file", path=list_file) from None
    samples = []
    for number, line in enumerate(lines, start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) > 2:
            raise CaffeError(f"line {number}: expected 'image [label]' or an id, got {len(fields)} fields", path=list_file)
        if "/" in fields[0]:
            image = _under_root(data_root, fields[0])
            label = _under_root(data_root, fields[1]) if labels and len(fields) == 2 else None
        elif len(fields) == 1:
            image = data_root / image_dir / f"{fields[0]}{image_ext}"
            label = data_root / label_dir / f"{fields[0]}{label_ext}" if labels else None
        else:
            raise CaffeError(f"line {number}: two fields must be paths ('/JPEGImages/x.jpg /Labels/x.png')", path=list_file)
        samples.append(Sample(id=image.stem, image=image, label=label))
    if not samples:
        raise CaffeError("the list is empty", path=list_file)
    missing = [str(path) for sample in samples for path in (sample.image, sample.label) if path and not path.is_file()]
    if missing:
        raise CaffeError(f"{len(missing)} listed files are missing under {data_root}: {listed(missing)}", path=list_file)
    return samples


def read_image(path: str | os.PathLike[str]) -> np.ndarray:
    """HxWx3 uint8 BGR, read with OpenCV's IMREAD_COLOR as Caffe's ImageSegData reads (grayscale made 3-channel)."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise CaffeError("cannot read the image (missing, truncated or not an image file)", path=path)
    return image


def read_label(path: str | os.PathLike[str], num_classes: int) -> np.ndarray:
    """HxW uint8 class indices of a palette ("P") or grayscale ("L") PNG; values must be < num_classes or 255."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            mode = image.mode
            if mode not in ("P", "L"):
                raise CaffeError(
                    f"label image mode {mode!r}: labels must be palette (P) or grayscale (L) PNGs of class indices",
                    path=path,
                )
            label = np.array(image, dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError) as error:
        raise CaffeError(f"cannot read the label image: {error}", path=path) from None
    values = np.unique(label)
    bad = [int(v) for v in values if v >= num_classes and v != IGNORE_LABEL]
    if bad:
        raise CaffeError(
            f"label values outside [0, {num_classes}) other than {IGNORE_LABEL}: {listed([str(v) for v in bad])}",
            path=path,
        )
    return label


def check_pair(image: np.ndarray, label: np.ndarray, sample: Sample) -> None:
    """An image and its label must cover the same pixels: refuse a size mismatch naming both files."""
    if image.shape[:2] != label.shape[:2]:
        (ih, iw), (lh, lw) = image.shape[:2], label.shape[:2]
        raise CaffeError(f"image is {iw}x{ih} but its label {sample.label} is {lw}x{lh}", path=sample.image)
