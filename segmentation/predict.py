"""`python -m segmentation predict`: segment any photos with a checkpoint; a palette label PNG and an overlay each.

Photos are read with Pillow: EXIF orientation applied, grayscale/RGBA/palette converted to RGB, shrunk so the
longer side is at most --max-size. They then go through the evaluation's protocol (mean from the checkpoint,
padded with it to 513 or the image's own aligned size, multi-scale net, zoom x8, crop, argmax). Outputs are at
the size the network saw (after orientation and --max-size): OUT/<name>.png and OUT/<name>_overlay.png.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from converter.atomic import write_atomic
from converter.errors import CaffeError, listed
from segmentation.distributed import Dist, resolve_device
from segmentation.evaluate import RELEASE_PAD, EvalOptions, check_pad, checkpoint_mean, class_map, score_images
from segmentation.overlay import overlay_image
from segmentation.voc import class_names, save_label_png
from verify.inputs import caffe_preprocess

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def find_images(inputs: Sequence[str | Path]) -> list[Path]:
    """Files given, and the pictures (by suffix) inside folders given; every missing path reported at once,
    and two inputs with one name (their outputs would collide) refused."""
    found, missing = [], []
    for given in map(Path, inputs):
        if given.is_dir():
            found += sorted(p for p in given.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif given.is_file():
            found.append(given)
        else:
            missing.append(str(given))
    if missing:
        raise CaffeError(f"{len(missing)} inputs do not exist: {listed(missing)}")
    if not found:
        raise CaffeError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {listed([str(p) for p in inputs])}")
    stems: dict[str, list[str]] = {}
    for path in found:
        stems.setdefault(path.stem, []).append(str(path))
    clashes = [paths for paths in stems.values() if len(paths) > 1]
    if clashes:
        raise CaffeError(f"inputs share a name, their outputs would overwrite each other: {listed(clashes[0])}")
    return found


def read_photo(path: Path, max_size: int) -> np.ndarray:
    """HxWx3 uint8 RGB of any photo Pillow reads: EXIF orientation applied, converted to RGB, the longer side
    shrunk to `max_size` (0: no limit) with Lanczos filtering."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as opened:
            image = ImageOps.exif_transpose(opened)
            if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
                # transparent pixels shown on white, not on whatever colour they happen to store
                background = Image.new("RGB", image.size, (255, 255, 255))
                background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
                image = background
            elif image.mode == "I;16" or image.mode == "I":
                image = Image.fromarray((np.asarray(image, dtype=np.float64) / 257).clip(0, 255).astype(np.uint8))
            image = image.convert("RGB")
            if max_size and max(image.size) > max_size:
                factor = max_size / max(image.size)
                size = (max(1, round(image.width * factor)), max(1, round(image.height * factor)))
                image = image.resize(size, Image.Resampling.LANCZOS)
            return np.asarray(image, dtype=np.uint8).copy()
    except (OSError, UnidentifiedImageError, ValueError) as error:
        raise CaffeError(f"cannot read the image: {error}", path=path) from None


def build_parser() -> argparse.ArgumentParser:
    """The predict command line (also `make predict`)."""
    parser = argparse.ArgumentParser(prog="python -m segmentation predict", description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="+", help="image files or folders of images (JPEG, PNG, ...)")
    parser.add_argument("--checkpoint", type=Path, required=True, help="checkpoint folder")
    parser.add_argument("--out", type=Path, required=True, help="folder for <name>.png and <name>_overlay.png")
    parser.add_argument("--max-size", type=int, default=1024, help="shrink so the longer side is at most this (0: never)")
    parser.add_argument("--pad", type=int, default=RELEASE_PAD, help="pad size as in evaluation (0: own aligned size)")
    parser.add_argument("--flip", action="store_true", help="also run the mirrored image; scores averaged")
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:N")
    parser.add_argument("--alpha", type=float, default=0.55, help="class colour weight in the overlay")
    parser.add_argument("--threads", type=int, help="CPU threads for PyTorch (on a shared CPU, 1 avoids OpenMP spinning)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Segment the images; prints a one-line summary; returns 0 (CaffeError for bad input)."""
    from converter.loading import load_model
    from verify.verdict import describe_parity

    args = build_parser().parse_args(argv)
    check_pad(args.pad)
    if args.max_size < 0 or not 0 <= args.alpha <= 1 or (args.threads or 1) < 1:
        raise CaffeError("--max-size must be >= 0, --alpha within [0, 1], --threads >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    images = find_images(args.images)
    device = resolve_device(args.device, Dist())
    model, manifest = load_model(args.checkpoint)
    print(describe_parity(manifest))
    model = model.to(device)
    mean = checkpoint_mean(manifest)
    names = class_names(model.num_classes)
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CaffeError(f"cannot create the folder: {error.strerror or error}", path=args.out) from None
    options = EvalOptions(flip=args.flip, pad=args.pad)
    start = time.perf_counter()
    with torch.inference_mode():
        for path in tqdm(images, desc="predict", unit="img"):
            rgb = read_photo(path, args.max_size)
            blob = torch.from_numpy(caffe_preprocess(np.ascontiguousarray(rgb[..., ::-1]), mean)).to(device)
            scores, _ = score_images(model, [blob], options)
            labels = class_map(scores[0]).to(torch.uint8).cpu().numpy()
            save_label_png(args.out / f"{path.stem}.png", labels)
            picture = overlay_image(rgb, labels, names, args.alpha)
            write_atomic(args.out / f"{path.stem}_overlay.png", lambda temporary: picture.save(temporary, format="PNG"))
    elapsed = time.perf_counter() - start
    print(f"{len(images)} images segmented in {elapsed:.1f} s; labels and overlays in {args.out}")
    return 0
