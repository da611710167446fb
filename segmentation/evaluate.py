"""`python -m segmentation eval`: score a checkpoint (or saved label PNGs) on a VOC-layout list, as DeepLab did.

The release protocol: each image padded at the bottom/right with the mean to 513x513, the multi-scale net
run, the fused map zoomed x8 (Caffe's Interp), cropped to the image, argmax; mIoU from one dataset-level
confusion matrix with label 255 ignored. Images larger than the pad size run at their own aligned size
(with a warning), never cropped. Options add test scales and flipping (scores averaged), DenseCRF, batching,
bf16 and the fast-inference switches. Under torchrun each rank scores its own shard and the confusion matrices
are summed, so the result equals a single process's.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from converter.atomic import write_atomic
from converter.errors import CaffeError, listed
from models.alignment import VOC_MEAN_BGR, prediction_input_size
from models.deeplab import predict_scores
from segmentation.crf import CRFParams, CRFWorkers, require_pydensecrf
from segmentation.distributed import Dist, init_distributed, leave_distributed, resolve_device
from segmentation.data import Sample, check_pair, read_image, read_label, read_list
from segmentation.fast import fold_batchnorm_into_convs
from segmentation.metrics import ConfusionMatrix, Scores
from segmentation.report import write_report
from segmentation.voc import NUM_CLASSES, class_names, save_label_png
from verify.inputs import caffe_preprocess

RELEASE_PAD = 513  # DeepLab's test nets pad every VOC image to 513x513 (VOC images are at most 500x500)
STRIDE = 8  # the score maps' stride; zooming x8 with aligned corners puts map pixel k at image pixel 8k


def checkpoint_mean(manifest: dict[str, Any]) -> tuple[float, float, float]:
    """The BGR mean a checkpoint was trained with (`preprocessing.mean_bgr` in its manifest), VOC's by default."""
    mean = (manifest.get("preprocessing") or {}).get("mean_bgr")
    if mean is None:
        return VOC_MEAN_BGR
    if len(mean) != 3:
        raise CaffeError(f"manifest preprocessing.mean_bgr must hold 3 values, got {mean!r}")
    return (float(mean[0]), float(mean[1]), float(mean[2]))


def padded_size(height: int, width: int, pad: int = RELEASE_PAD) -> tuple[int, int]:
    """The input size an image is padded to: pad x pad when it fits (the release), else the aligned size of
    each larger axis (pad 0: always the image's own aligned size)."""
    return (
        pad if 0 < height <= pad else prediction_input_size(height),
        pad if 0 < width <= pad else prediction_input_size(width),
    )


def check_pad(pad: int) -> None:
    """A pad size must be one the zoomed fused map covers exactly (32k+1, e.g. 321, 513), or 0."""
    if pad and prediction_input_size(pad) != pad:
        raise CaffeError(f"--pad {pad}: the multi-scale net needs a size 32k+1 (e.g. 321, 513), or 0 for each image's own")


@dataclass
class Item:
    """One loaded sample: the picture as read (for CRF and overlays), its label, and the padded network input."""

    sample: Sample
    image: np.ndarray  # HxWx3 uint8 BGR
    label: np.ndarray | None  # HxW uint8 class indices
    blob: np.ndarray  # 1x3xHxW float32, mean-subtracted (padded on the device, see score_images)


class EvalDataset(Dataset):
    """Samples read and preprocessed as Caffe's test data layer does; a bad file comes back as its CaffeError
    (raised by the evaluator in the main process, so a data-loader worker does not wrap it in a traceback)."""

    def __init__(self, samples: Sequence[Sample], num_classes: int, mean: tuple[float, float, float]) -> None:
        self.samples = list(samples)
        self.num_classes = num_classes
        self.mean = mean

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Item | CaffeError:
        sample = self.samples[index]
        try:
            image = read_image(sample.image)
            label = None
            if sample.label is not None:
                label = read_label(sample.label, self.num_classes)
                check_pair(image, label, sample)
        except CaffeError as error:
            return error
        return Item(sample, image, label, caffe_preprocess(image, self.mean))


def collate_items(batch: list[Item | CaffeError]) -> list[Item | CaffeError]:
    """Keep a batch a list: images differ in size, the evaluator stacks those padded alike."""
    return batch


@dataclass(frozen=True)
class EvalOptions:
    """How the scores are made: extra test scales and flipping (scores averaged), precision, pad size."""

    scales: tuple[float, ...] = (1.0,)
    flip: bool = False
    amp_dtype: torch.dtype | None = None  # torch.bfloat16 for bf16 autocast
    channels_last: bool = False
    pad: int = RELEASE_PAD


@dataclass
class Outputs:
    """Where per-image results go besides the confusion matrix."""

    predictions: Path | None = None  # palette PNGs <id>.png
    scores: Path | None = None  # fused stride-8 maps <id>.npy (float16)
    crf: CRFWorkers | None = None
    large_images: list[str] = field(default_factory=list)


def _forward(model: torch.nn.Module, batch: torch.Tensor, options: EvalOptions) -> torch.Tensor:
    """Zoomed scores of an already padded batch (N, C, P, P) in float32."""
    if options.channels_last:
        batch = batch.contiguous(memory_format=torch.channels_last)
    with torch.autocast(batch.device.type, dtype=options.amp_dtype or torch.float32, enabled=options.amp_dtype is not None):
        return predict_scores(model, batch).float()


def _padded(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A (1, 3, h, w) mean-subtracted image padded with zeros (the mean) at the bottom/right to `size`."""
    return F.pad(image, (0, size[1] - image.shape[-1], 0, size[0] - image.shape[-2]))


def score_images(
    model: torch.nn.Module, images: list[torch.Tensor], options: EvalOptions
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Class scores (C, h, w) of each mean-subtracted (1, 3, h, w) image, averaged over scales x flips, and the
    fused stride-8 map of the plain forward (scale 1, not flipped) covering the image, (C, ceil((h-1)/8)+1, ...).

    Each variant (image resized by the scale with bilinear interpolation, optionally mirrored) is padded as
    `padded_size` says, images padded alike run as one batch, the zoomed scores are cropped, mirrored back and
    resized to the image (bilinear) before averaging.
    """
    sizes = [tuple(image.shape[-2:]) for image in images]
    totals: list[torch.Tensor | None] = [None] * len(images)
    plain: list[torch.Tensor | None] = [None] * len(images)
    variants = [(scale, flipped) for scale in options.scales for flipped in ((False, True) if options.flip else (False,))]
    for scale, flipped in variants:
        groups: dict[tuple[int, int], list[tuple[int, torch.Tensor, tuple[int, int]]]] = {}
        for index, (image, (height, width)) in enumerate(zip(images, sizes)):
            variant = image.flip(-1) if flipped else image
            if scale != 1.0:
                scaled = (max(1, round(height * scale)), max(1, round(width * scale)))
                variant = F.interpolate(variant, size=scaled, mode="bilinear", align_corners=False)
            size = tuple(variant.shape[-2:])
            groups.setdefault(padded_size(*size, options.pad), []).append((index, variant, size))
        for pad_size, members in groups.items():
            batch = torch.cat([_padded(variant, pad_size) for _, variant, _ in members])
            zoomed = _forward(model, batch, options)
            for row, (index, _, (height, width)) in enumerate(members):
                scores = zoomed[row : row + 1]
                if scale == 1.0 and not flipped:
                    rows, cols = -(-(height - 1) // STRIDE) + 1, -(-(width - 1) // STRIDE) + 1
                    plain[index] = scores[0, :, : STRIDE * (rows - 1) + 1 : STRIDE, : STRIDE * (cols - 1) + 1 : STRIDE]
                scores = scores[..., :height, :width]
                if flipped:
                    scores = scores.flip(-1)
                if scores.shape[-2:] != sizes[index]:
                    scores = F.interpolate(scores, size=sizes[index], mode="bilinear", align_corners=False)
                totals[index] = scores[0] if totals[index] is None else totals[index] + scores[0]
    averaged = [total / len(variants) for total in totals]
    return averaged, plain


def class_map(scores: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """The argmax over the class axis `dim`, through `max` (same first-maximum ties): on the CPU, argmax over a
    channel-first axis is about 3x slower than max, which costs more than the tiny net's forward at 513."""
    return scores.max(dim=dim).indices


def _save_scores(path: Path, scores: torch.Tensor) -> None:
    array = scores.to(torch.float16).cpu().numpy()

    def write(temporary: Path) -> None:
        with open(temporary, "wb") as handle:
            np.save(handle, array)

    write_atomic(path, write)


def load_saved_scores(path: str | os.PathLike[str], height: int, width: int) -> torch.Tensor:
    """Scores saved with --save-scores, zoomed x8 as the test net does and cropped to the image: (C, H, W)."""
    from models.interp import caffe_interp

    scores = torch.from_numpy(np.load(path).astype(np.float32))[None]
    zoomed = caffe_interp(scores, STRIDE * (scores.shape[-2] - 1) + 1, STRIDE * (scores.shape[-1] - 1) + 1)
    if zoomed.shape[-2] < height or zoomed.shape[-1] < width:
        raise CaffeError(f"saved scores {tuple(scores.shape[-2:])} do not cover a {height}x{width} image", path=path)
    return zoomed[0, :, :height, :width]


def _items(batch: list[Item | CaffeError]) -> Iterator[Item]:
    for entry in batch:
        if isinstance(entry, CaffeError):
            raise entry
        yield entry


def evaluate(
    model: torch.nn.Module,
    loader: DataLoader,
    matrix: ConfusionMatrix,
    *,
    device: torch.device,
    options: EvalOptions = EvalOptions(),
    outputs: Outputs | None = None,
    progress: bool = True,
) -> int:
    """Run `model` over `loader` (batches of `Item`), adding every labelled image to `matrix`; returns the
    number of images. Predictions, stride-8 scores and CRF go where `outputs` says."""
    outputs = outputs or Outputs()

    def finish(item: Item, labels: np.ndarray | torch.Tensor) -> None:
        if item.label is not None:
            target = torch.from_numpy(item.label)
            matrix.update(target.to(labels.device) if isinstance(labels, torch.Tensor) else target, labels)
        if outputs.predictions is not None:
            array = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else labels
            save_label_png(outputs.predictions / f"{item.sample.id}.png", array)

    count = 0
    bar = tqdm(total=len(loader.dataset), desc="eval", unit="img", disable=not progress)
    with torch.inference_mode():
        for batch in loader:
            items = list(_items(batch))
            for item in items:
                if max(item.image.shape[:2]) > options.pad > 0:
                    outputs.large_images.append(item.sample.id)
            images = [torch.from_numpy(item.blob).to(device, non_blocking=True) for item in items]
            scores, plain = score_images(model, images, options)
            for item, item_scores, item_plain in zip(items, scores, plain):
                if outputs.scores is not None:
                    _save_scores(outputs.scores / f"{item.sample.id}.npy", item_plain)
                if outputs.crf is not None:
                    probabilities = torch.softmax(item_scores, dim=0).cpu().numpy()
                    outputs.crf.submit(item, item.image, probabilities, finish)
                else:
                    finish(item, class_map(item_scores))
            count += len(items)
            bar.update(len(items))
        if outputs.crf is not None:
            outputs.crf.drain(finish)
    bar.close()
    return count


def evaluate_predictions(
    samples: Sequence[Sample], predictions: Path, matrix: ConfusionMatrix, *, progress: bool = True
) -> int:
    """Score saved label PNGs `<predictions>/<id>.png` (from this tool, Caffe, anything) against the samples'
    labels; a missing prediction (all reported), a size mismatch or an out-of-range value is a CaffeError."""
    files = [predictions / f"{sample.id}.png" for sample in samples]
    missing = [str(path) for path in files if not path.is_file()]
    if missing:
        raise CaffeError(f"{len(missing)} predictions are missing: {listed(missing)}", path=predictions)
    for sample, path in tqdm(list(zip(samples, files)), desc="score", unit="img", disable=not progress):
        if sample.label is None:
            raise CaffeError("the list gives no label for this image", path=sample.image)
        label = read_label(sample.label, matrix.num_classes)
        prediction = read_label(path, matrix.num_classes)
        if prediction.shape != label.shape:
            (ph, pw), (lh, lw) = prediction.shape, label.shape
            raise CaffeError(f"prediction is {pw}x{ph} but the label {sample.label} is {lw}x{lh}", path=path)
        if int(prediction.max()) >= matrix.num_classes:
            raise CaffeError(f"prediction holds {int(prediction.max())}, not a class index", path=path)
        matrix.update(label, prediction)
    return len(samples)


def build_parser() -> argparse.ArgumentParser:
    """The eval command line (also `make eval`)."""
    parser = argparse.ArgumentParser(
        prog="python -m segmentation eval",
        description="Evaluate a checkpoint (or saved label PNGs) on a VOC-layout list: mIoU from one dataset-level "
        "confusion matrix, label 255 ignored, as DeepLab's release (pad to 513 with the mean, multi-scale net, zoom x8, "
        "crop, argmax). Writes OUT/report.json, report.md and plots.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path, help="checkpoint folder (converted release model or training snapshot)")
    source.add_argument("--predictions", type=Path, help="folder of label PNGs <id>.png to score instead of a model")
    parser.add_argument("--data", type=Path, required=True, help="dataset root (the list's paths are relative to it)")
    parser.add_argument("--list", type=Path, required=True, help="list file: '/JPEGImages/x.jpg /SegmentationClassAug/x.png' lines or bare ids")
    parser.add_argument("--out", type=Path, required=True, help="report folder")
    parser.add_argument("--num-classes", type=int, default=NUM_CLASSES, help="classes in the dataset (default 21, VOC)")
    parser.add_argument("--image-dir", default="JPEGImages", help="image folder for bare-id lists")
    parser.add_argument("--label-dir", default="SegmentationClassAug", help="label folder for bare-id lists")
    parser.add_argument("--image-ext", default=".jpg")
    parser.add_argument("--label-ext", default=".png")
    parser.add_argument("--pad", type=int, default=RELEASE_PAD,
                        help="pad images to PAD x PAD with the mean (Caffe's test net: 513); larger images run at "
                        "their own aligned size, never cropped; 0: every image at its own aligned size")
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0],
                        help="test scales on top of the net's own 1/0.75/0.5 towers; scores averaged (default 1.0 only)")
    parser.add_argument("--flip", action="store_true", help="also run mirrored images; scores averaged")
    parser.add_argument("--batch-size", type=int, default=None, help="images per forward (default 8 on GPU, 1 on CPU)")
    parser.add_argument("--workers", type=int, default=2, help="data-loader worker processes")
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:N")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None, help="bf16 autocast (default on GPU)")
    parser.add_argument("--fold-bn", action=argparse.BooleanOptionalAction, default=True,
                        help="fold BatchNorm+Scale into the convolutions (default on: float rounding-level changes, "
                        "within the parity budget; make bench-eval checks it)")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                        help="channels_last memory format (default on: 2-3x faster on a CPU, same math)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile (default on GPU)")
    parser.add_argument("--save-predictions", type=Path, help="write palette PNGs <id>.png in VOC colours here")
    parser.add_argument("--save-scores", type=Path,
                        help="write the fused stride-8 score maps <id>.npy (float16, plain forward) here; zoom x8 and "
                        "crop when reading back (segmentation.evaluate.load_saved_scores), e.g. to tune the CRF")
    crf = parser.add_argument_group(
        "DenseCRF", "defaults: the DeepLab-v2 ResNet-101 project page's values; the DenseCRF block commented out in "
        "the release's test prototxts holds other numbers and is only a template. Needs the 'crf' extra (pydensecrf2).")
    defaults = CRFParams()
    crf.add_argument("--crf", action="store_true", help="refine each prediction with DenseCRF on the softmax of the zoomed scores")
    crf.add_argument("--crf-iterations", type=int, default=defaults.iterations)
    crf.add_argument("--crf-bilateral-weight", type=float, default=defaults.bilateral_weight)
    crf.add_argument("--crf-bilateral-xy-std", type=float, default=defaults.bilateral_xy_std)
    crf.add_argument("--crf-bilateral-rgb-std", type=float, default=defaults.bilateral_rgb_std)
    crf.add_argument("--crf-position-weight", type=float, default=defaults.position_weight)
    crf.add_argument("--crf-position-xy-std", type=float, default=defaults.position_xy_std)
    crf.add_argument("--crf-workers", type=int, default=max(1, (os.cpu_count() or 2) - 1), help="CRF processes")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--threads", type=int, help="CPU threads for PyTorch (on a shared CPU, 1 avoids OpenMP spinning)")
    return parser


def _prepare_model(args: argparse.Namespace, device: torch.device, rank: int) -> tuple[torch.nn.Module, dict[str, Any], EvalOptions]:
    from converter.loading import load_model
    from verify.verdict import describe_parity

    model, manifest = load_model(args.checkpoint)
    if rank == 0:
        print(describe_parity(manifest))
    if model.num_classes != args.num_classes:
        raise CaffeError(
            f"checkpoint predicts {model.num_classes} classes, the dataset has {args.num_classes} (--num-classes)",
            path=args.checkpoint,
        )
    gpu = device.type == "cuda"
    if args.fold_bn:
        fold_batchnorm_into_convs(model)
    channels_last = args.channels_last
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if args.compile if args.compile is not None else gpu:
        model = torch.compile(model)
    options = EvalOptions(
        scales=tuple(args.scales),
        flip=args.flip,
        amp_dtype=torch.bfloat16 if (args.bf16 if args.bf16 is not None else gpu) else None,
        channels_last=channels_last,
        pad=args.pad,
    )
    return model, manifest, options


def _check_args(args: argparse.Namespace) -> None:
    check_pad(args.pad)
    if args.num_classes < 1 or args.num_classes > 255:
        raise CaffeError(f"--num-classes must lie in 1..255, got {args.num_classes}")
    if any(scale <= 0 for scale in args.scales):
        raise CaffeError(f"--scales must be positive, got {args.scales}")
    if args.save_scores is not None and 1.0 not in args.scales:
        raise CaffeError("--save-scores saves the plain forward's map: --scales must include 1")
    if args.batch_size is not None and args.batch_size < 1:
        raise CaffeError(f"--batch-size must be positive, got {args.batch_size}")
    if args.workers < 0 or args.crf_workers < 1 or args.crf_iterations < 0 or (args.threads or 1) < 1:
        raise CaffeError("--workers must be >= 0, --crf-workers >= 1, --crf-iterations >= 0, --threads >= 1")
    if args.predictions is not None:
        given = [flag for flag, value in (("--crf", args.crf), ("--save-predictions", args.save_predictions),
                                          ("--save-scores", args.save_scores), ("--flip", args.flip)) if value]
        if given or args.scales != [1.0]:
            raise CaffeError(f"--predictions scores saved labels; {listed(given or ['--scales'])} need a --checkpoint")
    if args.crf:
        require_pydensecrf()


def _make_folders(args: argparse.Namespace) -> None:
    """Created only once the inputs have been checked, so bad input leaves nothing behind."""
    for folder in (args.out, args.save_predictions, args.save_scores):
        if folder is not None:
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise CaffeError(f"cannot create the folder: {error.strerror or error}", path=folder) from None


def main(argv: Sequence[str] | None = None) -> int:
    """Evaluate; prints the parity verdict, a progress bar and a one-line summary; returns 0 (CaffeError for bad input)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    _check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    gpu = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
    place = init_distributed("cuda" if gpu else "cpu")
    try:
        return _run(args, place)
    finally:
        leave_distributed()


def _run(args: argparse.Namespace, place: Dist) -> int:
    """The evaluation of `main` for this process's shard; rank 0 writes the report."""
    rank, world = place.rank, place.world_size
    samples = read_list(args.list, args.data, image_dir=args.image_dir, label_dir=args.label_dir,
                        image_ext=args.image_ext, label_ext=args.label_ext)
    shard = samples[rank::world]  # unpadded: every sample on exactly one rank
    if args.predictions is not None and not args.predictions.is_dir():
        raise CaffeError("the predictions folder does not exist", path=args.predictions)
    matrix = ConfusionMatrix(args.num_classes)
    start = time.perf_counter()
    meta: dict[str, Any] = {"images": len(samples), "list": str(args.list), "data": str(args.data)}
    if args.predictions is not None:
        evaluate_predictions(shard, args.predictions, matrix, progress=not args.quiet and rank == 0)
        meta.update(source=f"predictions {args.predictions}", parity="n/a (saved predictions)", protocol="saved label PNGs")
        large: list[str] = []
    else:
        device = resolve_device(args.device, place)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        model, manifest, options = _prepare_model(args, device, rank)
        from verify.verdict import describe_parity

        mean = checkpoint_mean(manifest)
        batch_size = args.batch_size or (8 if device.type == "cuda" else 1)
        loader = DataLoader(
            EvalDataset(shard, args.num_classes, mean), batch_size=batch_size, num_workers=args.workers,
            collate_fn=collate_items,
        )
        _make_folders(args)
        crf = CRFWorkers(_crf_params(args), args.crf_workers) if args.crf else None
        outputs = Outputs(predictions=args.save_predictions, scores=args.save_scores, crf=crf)
        try:
            evaluate(model, loader, matrix, device=device, options=options, outputs=outputs,
                             progress=not args.quiet and rank == 0)
        finally:
            if crf is not None:
                crf.close()
        large = outputs.large_images
        meta.update(
            source=f"checkpoint {args.checkpoint}",
            parity=describe_parity(manifest),
            mean_bgr=list(mean),
            protocol=_protocol(args, options),
        )
    matrix.all_reduce()
    elapsed = time.perf_counter() - start
    if rank != 0:
        return 0
    if large:
        print(f"warning: {len(large)} images larger than {args.pad} ran at their own aligned size: {listed(large)}",
              file=sys.stderr)
    scores = matrix.compute()
    if scores.pixels == 0:
        raise CaffeError("no labelled pixels to score (every label is 255, or the list has no labels)", path=args.list)
    names = class_names(args.num_classes)
    if scores.absent:
        print(f"warning: classes absent from ground truth and predictions, left out of the means: "
              f"{', '.join(names[c] for c in scores.absent)}", file=sys.stderr)
    _make_folders(args)
    write_report(args.out, scores, names, matrix.matrix.cpu().numpy(), meta)
    print(summary_line(scores, len(samples), elapsed, world) + f"; report in {args.out}")
    return 0


def _crf_params(args: argparse.Namespace) -> CRFParams:
    return CRFParams(
        iterations=args.crf_iterations,
        bilateral_weight=args.crf_bilateral_weight,
        bilateral_xy_std=args.crf_bilateral_xy_std,
        bilateral_rgb_std=args.crf_bilateral_rgb_std,
        position_weight=args.crf_position_weight,
        position_xy_std=args.crf_position_xy_std,
    )


def _protocol(args: argparse.Namespace, options: EvalOptions) -> str:
    parts = [f"pad {options.pad}" if options.pad else "own aligned size", "multi-scale net, zoom x8, crop, argmax"]
    if options.scales != (1.0,):
        parts.append(f"test scales {', '.join(f'{s:g}' for s in options.scales)}")
    if options.flip:
        parts.append("flip")
    if options.amp_dtype is not None:
        parts.append("bf16")
    if args.crf:
        parts.append(f"DenseCRF {_crf_params(args)}")
    return "; ".join(parts)


def summary_line(scores: Scores, images: int, seconds: float, world: int = 1) -> str:
    """`mIoU 76.35% | pixel acc ... | N images in T s (R images/s)`."""
    def percent(value: float | None) -> str:
        return "n/a" if value is None else f"{100 * value:.2f}%"

    rate = images / seconds if seconds > 0 else float("inf")
    ranks = f" on {world} processes" if world > 1 else ""
    return (f"mIoU {percent(scores.miou)} | pixel accuracy {percent(scores.pixel_accuracy)} | mean accuracy "
            f"{percent(scores.mean_accuracy)} | fwIoU {percent(scores.fwiou)} | {images} images in {seconds:.1f} s "
            f"({rate:.2f} images/s){ranks}")
