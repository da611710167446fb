"""`make bench-eval`: evaluation throughput (images/s, multi-scale net, zoom x8, argmax) in one run.

(a) the earlier port's protocol: fp32, PyTorch's defaults (TF32 convolutions allowed on GPU), batch 1;
(b) this evaluator's fast defaults: BatchNorm+Scale folded into the convolutions (checked against the parity
    noise budget first), bf16 autocast, channels_last, torch.compile (GPU default), batching;
(c) on the CPU, the runtime Caffe users have today: OpenCV 4.x dnn running the same Caffe net (the synthetic
    test prototxt + caffemodel of `converter.synthetic`, fusion on, its fastest setting) on the same images.
Reports images/s, the ratios, (b)'s argmax agreement with (a) over all pixels and, on a GPU, the achieved
fraction of bf16 peak. Targets are reported, never asserted: a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from benchmarks.opencv_net import load_opencv_net
from converter.caffe.load import load_net
from converter.deeplab.convert import convert_deeplab
from converter.loading import load_model, load_weights_strictly
from converter.synthetic.weights import CONFIGS, FILE_NAMES, write_synthetic_deeplab
from models.deeplab import DeepLabV2MSC, predict_scores
from segmentation.evaluate import class_map
from segmentation.fast import fold_batchnorm_into_convs
from verify.compare import BUDGET_FACTOR, END_TO_END_FLOOR
from verify.inputs import caffe_preprocess, synthetic_image

GPU_TARGET = 450.0  # images/s at 513 for (b) on one H200/H100
CPU_TARGET = 3.0  # (b) / OpenCV at 321 and 513
AGREEMENT_TARGET = 0.995
BF16_PEAK = {"H100": 989.4e12, "H200": 989.4e12}  # dense bf16 FLOP/s of the SXM parts (NVIDIA data sheets)


@dataclass
class Row:
    label: str
    size: int
    batch: int
    images_per_s: float
    agreement: float | None = None
    note: str = ""


def _prepare(work: Path, config_name: str) -> tuple[Path, Path]:
    """The synthetic multi-scale test net (prototxt, caffemodel), written once per config into `work`."""
    folder = work / config_name
    prototxt_name, caffemodel_name = FILE_NAMES["msc_test"]
    prototxt, caffemodel = folder / prototxt_name, folder / caffemodel_name
    if not (prototxt.is_file() and caffemodel.is_file()):
        print(f"writing the synthetic {config_name} net into {folder} ...", flush=True)
        write_synthetic_deeplab(folder, "msc_test", CONFIGS[config_name](), input_size=(513, 513))
    return prototxt, caffemodel


def _model(prototxt: Path, caffemodel: Path) -> DeepLabV2MSC:
    converted = convert_deeplab(load_net(weights=caffemodel, prototxt=prototxt))
    model = DeepLabV2MSC(converted.num_classes, converted.config, converted.bn_eps)
    load_weights_strictly(model, converted.state_dict, source=caffemodel)
    return model.eval()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _labels(model: torch.nn.Module, batch: torch.Tensor, amp: bool, channels_last: bool, fast: bool) -> torch.Tensor:
    if channels_last:
        batch = batch.contiguous(memory_format=torch.channels_last)
    with torch.autocast(batch.device.type, dtype=torch.bfloat16, enabled=amp):
        scores = predict_scores(model, batch)
    return class_map(scores, dim=1) if fast else scores.argmax(dim=1)


def _run(model: torch.nn.Module, blobs: torch.Tensor, batch: int, *, amp: bool, channels_last: bool,
         device: torch.device, repeat: int, fast: bool) -> tuple[float, torch.Tensor]:
    """Best images/s over `repeat` passes over all images (after one warm-up pass) and the labels (on CPU)."""
    labels = []
    with torch.inference_mode():
        for start in range(0, len(blobs), batch):  # warm-up: kernel selection, compilation, allocations
            labels.append(_labels(model, blobs[start : start + batch].to(device), amp, channels_last, fast).cpu())
        best = 0.0
        for _ in range(repeat):
            _sync(device)
            started = time.perf_counter()
            for start in range(0, len(blobs), batch):
                _labels(model, blobs[start : start + batch].to(device, non_blocking=True), amp, channels_last, fast)
            _sync(device)
            best = max(best, len(blobs) / (time.perf_counter() - started))
    return best, torch.cat(labels)


def _fold_within_budget(model: DeepLabV2MSC, folded: torch.nn.Module, blob: torch.Tensor) -> tuple[bool, str]:
    """Folding passes when its fp32 error against a float64 run stays within the verifier's budget:
    BUDGET_FACTOR x the unfolded fp32 model's own error, never below END_TO_END_FLOOR of the scale."""
    with torch.inference_mode():
        exact = predict_scores(model.double(), blob.double())
        model.float()
        plain = (predict_scores(model, blob).double() - exact).abs().max().item()
        fold = (predict_scores(folded, blob).double() - exact).abs().max().item()
    scale = exact.abs().max().item()
    allowed = max(BUDGET_FACTOR * plain, END_TO_END_FLOOR.max_rel * scale)
    return fold <= allowed, f"folded fp32 max|err| {fold:.2e} vs unfolded {plain:.2e} (allowed {allowed:.2e})"


def _opencv_rate(prototxt: Path, caffemodel: Path, images: list[np.ndarray], repeat: int) -> tuple[float, np.ndarray]:
    """OpenCV dnn, fusion on, CPU: images/s of the test net's forward plus argmax, and its labels."""
    net = load_opencv_net(prototxt, caffemodel, caffe_preprocess(images[0]))
    height, width = images[0].shape[:2]

    def forward(image: np.ndarray) -> np.ndarray:
        net.setInput(caffe_preprocess(image))
        return net.forward()[0, :, :height, :width].argmax(axis=0)

    labels = [forward(image) for image in images]  # warm-up
    best = 0.0
    for _ in range(repeat):
        started = time.perf_counter()
        for image in images:
            forward(image)
        best = max(best, len(images) / (time.perf_counter() - started))
    return best, np.stack(labels)


def _flops_per_image(model: torch.nn.Module, blob: torch.Tensor) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        predict_scores(model, blob)
    return counter.get_total_flops() / blob.shape[0]


@dataclass(frozen=True)
class Variant:
    """One fast configuration measured as (b)."""

    label: str
    amp: bool
    channels_last: bool
    compile: bool
    batch: int


def fast_variants(args: argparse.Namespace, gpu: bool) -> list[Variant]:
    """The evaluator's fast defaults on this device (`segmentation eval`'s: bf16 and compile on GPUs only,
    folding and channels_last everywhere), and on the CPU also the same with bf16, unless flags pin them."""
    channels_last = True if args.channels_last is None else args.channels_last
    compiled = gpu if args.compile is None else args.compile
    batch = args.batch or (16 if gpu else 1)
    if args.bf16 is not None or gpu:
        amp = True if args.bf16 is None else args.bf16
        return [Variant("(b)", amp, channels_last, compiled, batch)]
    return [Variant("(b)", False, channels_last, compiled, batch), Variant("(b')", True, channels_last, compiled, batch)]


def _bench_size(args: argparse.Namespace, source: ModelSource, size: int, device: torch.device,
                fold: tuple[bool, str] | None) -> tuple[list[Row], tuple[bool, str]]:
    images = [synthetic_image(size, size, seed=seed) for seed in range(args.images)]
    blobs = torch.from_numpy(np.concatenate([caffe_preprocess(image) for image in images]))
    gpu = device.type == "cuda"
    rows = []
    model = source.build().to(device)
    torch.backends.cudnn.allow_tf32 = True  # PyTorch's default for convolutions, stated
    rate, reference = _run(model, blobs, 1, amp=False, channels_last=False, device=device, repeat=args.repeat,
                           fast=False)
    rows.append(Row("(a) fp32, PyTorch defaults, batch 1", size, 1, rate))
    if fold is None:  # checked once, at the first size: a float64 forward of the full net is slow on a CPU
        folded = source.build()
        fold_batchnorm_into_convs(folded)
        fold = _fold_within_budget(source.build(), folded, blobs[:1])
    fold_ok, fold_note = fold
    for variant in fast_variants(args, gpu):
        fast = source.build()
        if fold_ok:
            fold_batchnorm_into_convs(fast)
        fast = fast.to(device)
        if variant.channels_last:
            fast = fast.to(memory_format=torch.channels_last)
        if variant.compile:
            fast = torch.compile(fast)
        rate, labels = _run(fast, blobs, variant.batch, amp=variant.amp, channels_last=variant.channels_last,
                            device=device, repeat=args.repeat, fast=True)
        switches = [name for name, on in (("BN folded", fold_ok), ("bf16", variant.amp),
                                          ("channels_last", variant.channels_last), ("compile", variant.compile)) if on]
        rows.append(Row(f"{variant.label} fast: {', '.join(switches)}", size, variant.batch, rate,
                        float((labels == reference).float().mean()), fold_note))
        if gpu:
            peak = next((value for name, value in BF16_PEAK.items() if name in torch.cuda.get_device_name(device)), None)
            flops = _flops_per_image(model, blobs[:1].to(device))
            rows[-1].note += f"; {flops / 1e9:.1f} GFLOP/image" + (
                f", {rate * flops / peak:.1%} of bf16 peak" if peak else ", bf16 peak unknown for this device")
    if not gpu and source.caffe is not None and not args.no_opencv:
        rate, cv_labels = _opencv_rate(*source.caffe, images, args.repeat)
        agreement = float((torch.from_numpy(cv_labels) == reference).float().mean())
        rows.append(Row("(c) OpenCV dnn, fusion on, batch 1", size, 1, rate, agreement))
    return rows, fold


@dataclass(frozen=True)
class ModelSource:
    """Where the benchmarked model comes from: the synthetic Caffe net (then OpenCV can run it too) or a checkpoint."""

    caffe: tuple[Path, Path] | None = None  # (prototxt, caffemodel)
    checkpoint: Path | None = None

    def build(self) -> torch.nn.Module:
        if self.checkpoint is not None:
            return load_model(self.checkpoint)[0]
        return _model(*self.caffe)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_eval", description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="resnet101")
    parser.add_argument("--sizes", type=int, nargs="+", default=[321, 513], help="square input sizes")
    parser.add_argument("--images", type=int, default=4, help="synthetic images per size")
    parser.add_argument("--repeat", type=int, default=2, help="timed passes (best)")
    parser.add_argument("--batch", type=int, default=None, help="(b)'s batch (default 16 on GPU, 1 on CPU)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                        help="(b) bf16 (default: on GPU; on CPU both, as (b) and (b'))")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="(b) compile (default GPU)")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None, help="(b) default on")
    parser.add_argument("--no-opencv", action="store_true", help="skip (c)")
    parser.add_argument("--checkpoint", type=Path,
                        help="benchmark this checkpoint (e.g. a trained one, for the binding argmax agreement) instead "
                        "of the synthetic net; (c) is then skipped")
    parser.add_argument("--work", type=Path, default=Path("build/bench_eval"), help="cache of the generated net")
    parser.add_argument("--threads", type=int, help="CPU threads for PyTorch and OpenCV alike (default: their own)")
    args = parser.parse_args(argv)
    if args.threads:
        import cv2

        torch.set_num_threads(args.threads)
        cv2.setNumThreads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    source = ModelSource(checkpoint=args.checkpoint) if args.checkpoint else ModelSource(caffe=_prepare(args.work, args.config))
    rows: list[Row] = []
    fold = None
    for size in args.sizes:
        sized, fold = _bench_size(args, source, size, device, fold)
        rows += sized
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    what = f"checkpoint {args.checkpoint}" if args.checkpoint else f"synthetic {args.config} net"
    print(f"\nbench-eval: {what}, {args.images} synthetic images per size, best of {args.repeat} passes")
    print(f"device: {name}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
          f"Python {platform.python_version()}")
    print("\n| path | size | batch | images/s | x (a) | argmax agreement with (a) | notes |\n|---|---|---|---|---|---|---|")
    for size in args.sizes:
        sized = [row for row in rows if row.size == size]
        baseline = sized[0].images_per_s
        for row in sized:
            agreement = "-" if row.agreement is None else f"{row.agreement:.4%}"
            print(f"| {row.label} | {size} | {row.batch} | {row.images_per_s:.2f} | {row.images_per_s / baseline:.2f} "
                  f"| {agreement} | {row.note} |")
    print()
    for size in args.sizes:
        sized = {row.label.split()[0]: row for row in rows if row.size == size}
        fast = [label for label in sized if label.startswith("(b")]
        if "(c)" in sized:
            for label in ["(a)", *fast]:
                ratio = sized[label].images_per_s / sized["(c)"].images_per_s
                verdict = f" (target >= {CPU_TARGET:g}x: {'PASS' if ratio >= CPU_TARGET else 'FAIL'})" if label != "(a)" else ""
                print(f"{size}: {label} = {ratio:.2f}x OpenCV{verdict}")
        if device.type == "cuda" and size == 513:
            rate = sized["(b)"].images_per_s
            print(f"513: (b) {rate:.1f} images/s (target >= {GPU_TARGET:g}: {'PASS' if rate >= GPU_TARGET else 'FAIL'})")
        for label in fast:
            agreement = sized[label].agreement or 0.0
            kind = "on this checkpoint" if args.checkpoint else "informational on synthetic weights"
            print(f"{size}: {label} argmax agreement with fp32 {agreement:.4%} ({kind}; binding >= "
                  f"{AGREEMENT_TARGET:.1%} on a trained full-size checkpoint)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
