"""A small synthetic dataset in VOC's layout, for the demo and the tests: `python -m segmentation demo-data`.

Each image has a textured background (class 0) and one to three objects. An object's class decides
its shape (disc, square, triangle, ring, cross), its texture (stripes, checks, dots, plain, waves) and
its hue, so a net can learn the classes from what it sees. Labels are palette PNGs in VOC colours with a
2-pixel band of 255 along every object border, as VOC's boundaries. Written: `JPEGImages/<id>.jpg`,
`SegmentationClassAug/<id>.png`, `list/train.txt` and `list/val.txt` in DeepLab's format
(`/JPEGImages/<id>.jpg /SegmentationClassAug/<id>.png`) and `list/train_ids.txt` / `list/val_ids.txt`.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from converter.atomic import write_atomic
from converter.errors import CaffeError
from segmentation.voc import IGNORE_LABEL, save_label_png

log = logging.getLogger(__name__)

SHAPES = ("disc", "square", "triangle", "ring", "cross")
TEXTURES = ("stripes", "checks", "dots", "plain", "waves")
MAX_CLASSES = len(SHAPES)  # object classes 1..5 (VOC: aeroplane, bicycle, bird, boat, bottle)
BOUNDARY_WIDTH = 2
IMAGE_DIR, LABEL_DIR, LIST_DIR = "JPEGImages", "SegmentationClassAug", "list"


@dataclass(frozen=True)
class DemoSpec:
    """How many images, their size range (pixels, each side), the object classes used, the seed."""

    train: int = 60
    val: int = 20
    min_size: int = 96
    max_size: int = 160
    classes: int = MAX_CLASSES
    seed: int = 0

    def __post_init__(self) -> None:
        if self.train < 1 or self.val < 1:
            raise CaffeError(f"need at least one train and one val image, got {self.train} / {self.val}")
        if not 1 <= self.classes <= MAX_CLASSES:
            raise CaffeError(f"object classes must be 1..{MAX_CLASSES}, got {self.classes}")
        if not 32 <= self.min_size <= self.max_size:
            raise CaffeError(f"sizes must satisfy 32 <= min_size <= max_size, got {self.min_size}, {self.max_size}")


def _shape_mask(shape: str, height: int, width: int, cy: int, cx: int, radius: int) -> np.ndarray:
    mask = np.zeros((height, width), dtype=np.uint8)
    if shape == "disc":
        cv2.circle(mask, (cx, cy), radius, 1, -1)
    elif shape == "square":
        cv2.rectangle(mask, (cx - radius, cy - radius), (cx + radius, cy + radius), 1, -1)
    elif shape == "triangle":
        points = np.array([[cx, cy - radius], [cx - radius, cy + radius], [cx + radius, cy + radius]], dtype=np.int32)
        cv2.fillPoly(mask, [points], 1)
    elif shape == "ring":
        cv2.circle(mask, (cx, cy), radius, 1, -1)
        cv2.circle(mask, (cx, cy), radius // 2, 0, -1)
    else:  # cross
        arm = max(2, radius // 3)
        cv2.rectangle(mask, (cx - radius, cy - arm), (cx + radius, cy + arm), 1, -1)
        cv2.rectangle(mask, (cx - arm, cy - radius), (cx + arm, cy + radius), 1, -1)
    return mask.astype(bool)


def _texture(kind: str, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """A pattern in [0, 1] of the given kind, with a random phase."""
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi)
    if kind == "stripes":
        return 0.5 + 0.5 * np.sign(np.sin(cols / 2.0 + phase))
    if kind == "checks":
        return ((rows // 4 + cols // 4) % 2).astype(np.float32)
    if kind == "dots":
        return ((np.sin(rows / 1.5 + phase) * np.sin(cols / 1.5)) > 0.6).astype(np.float32)
    if kind == "waves":
        return 0.5 + 0.5 * np.sin((rows + 3 * np.sin(cols / 4.0)) / 2.0 + phase)
    return np.full((height, width), 0.5, dtype=np.float32)


def _hue_bgr(index: int, classes: int) -> np.ndarray:
    hsv = np.array([[[int(180 * index / classes), 200, 220]]], dtype=np.uint8)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0].astype(np.float32)


def make_sample(spec: DemoSpec, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One (HxWx3 uint8 BGR image, HxW uint8 label) pair."""
    height, width = (int(v) for v in rng.integers(spec.min_size, spec.max_size + 1, size=2))
    noise = cv2.GaussianBlur(rng.normal(0, 1, (height, width)).astype(np.float32), (0, 0), 6)
    background = 110 + 40 * noise / (np.abs(noise).max() + 1e-6)
    image = np.repeat(background[..., None], 3, axis=2) + rng.normal(0, 6, (height, width, 3))
    label = np.zeros((height, width), dtype=np.uint8)
    for _ in range(int(rng.integers(1, 4))):
        cls = int(rng.integers(1, spec.classes + 1))
        radius = int(rng.integers(min(height, width) // 8, min(height, width) // 4 + 1))
        cy = int(rng.integers(radius, height - radius))
        cx = int(rng.integers(radius, width - radius))
        mask = _shape_mask(SHAPES[cls - 1], height, width, cy, cx, radius)
        pattern = _texture(TEXTURES[cls - 1], height, width, rng)[..., None]
        colour = _hue_bgr(cls - 1, spec.classes)
        image[mask] = (colour * (0.55 + 0.45 * pattern))[mask] + rng.normal(0, 4, (int(mask.sum()), 3))
        label[mask] = cls
    kernel = np.ones((BOUNDARY_WIDTH + 1, BOUNDARY_WIDTH + 1), dtype=np.uint8)
    border = cv2.dilate(label, kernel) != cv2.erode(label, kernel)
    label[border] = IGNORE_LABEL
    return np.clip(image, 0, 255).astype(np.uint8), label


def write_demo_dataset(out: str | os.PathLike[str], spec: DemoSpec) -> dict[str, int]:
    """Write the dataset under `out`; returns the image count per split. Lists are written last."""
    root = Path(out)
    for folder in (IMAGE_DIR, LABEL_DIR, LIST_DIR):
        try:
            (root / folder).mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise CaffeError(f"cannot create the dataset folder: {error.strerror or error}", path=root / folder) from None
    rng = np.random.default_rng(spec.seed)
    splits = {"train": spec.train, "val": spec.val}
    ids: dict[str, list[str]] = {}
    with tqdm(total=sum(splits.values()), desc="demo data", unit="img") as progress:
        for split, count in splits.items():
            ids[split] = []
            for index in range(count):
                sample_id = f"{split}_{index:05d}"
                image, label = make_sample(spec, rng)
                write_atomic(
                    root / IMAGE_DIR / f"{sample_id}.jpg",
                    lambda path, img=image: _write_jpeg(path, img),
                )
                save_label_png(root / LABEL_DIR / f"{sample_id}.png", label)
                ids[split].append(sample_id)
                progress.update()
    for split, names in ids.items():
        pairs = "".join(f"/{IMAGE_DIR}/{name}.jpg /{LABEL_DIR}/{name}.png\n" for name in names)
        write_atomic(root / LIST_DIR / f"{split}.txt", lambda path, text=pairs: path.write_text(text))
        bare = "".join(f"{name}\n" for name in names)
        write_atomic(root / LIST_DIR / f"{split}_ids.txt", lambda path, text=bare: path.write_text(text))
    return splits


def _write_jpeg(path: Path, image: np.ndarray) -> None:
    ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 95])
    if not ok:
        raise CaffeError("OpenCV could not encode the JPEG", path=path)
    path.write_bytes(encoded.tobytes())


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m segmentation demo-data --out DIR`: write the synthetic dataset."""
    parser = argparse.ArgumentParser(prog="python -m segmentation demo-data", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="dataset root to write")
    defaults = DemoSpec()
    parser.add_argument("--train", type=int, default=defaults.train, help="training images")
    parser.add_argument("--val", type=int, default=defaults.val, help="validation images")
    parser.add_argument("--min-size", type=int, default=defaults.min_size, help="smallest image side")
    parser.add_argument("--max-size", type=int, default=defaults.max_size, help="largest image side")
    parser.add_argument("--classes", type=int, default=defaults.classes, help=f"object classes (1..{MAX_CLASSES})")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="random seed (same seed, same files)")
    args = parser.parse_args(argv)
    spec = DemoSpec(args.train, args.val, args.min_size, args.max_size, args.classes, args.seed)
    counts = write_demo_dataset(args.out, spec)
    print(f"demo dataset: {counts['train']} train + {counts['val']} val images in {args.out} (lists in {args.out}/{LIST_DIR})")
    return 0
