"""`make bench-onnx`: the exported DeepLab net in onnxruntime (CPU) against this project's PyTorch forward and
against OpenCV 4.x dnn running the original Caffe net, same images, same run, images/s at 321.

All three compute the multi-scale net's fused stride-8 score map (`fc_fusion`) of the same synthetic
caffemodel (`converter.synthetic`), batch 1, fp32, on the CPU, with each runtime's default threads. The
PyTorch forward is the baseline; each row also gives its largest difference from it relative to the map's
scale. The ONNX file is exported (and self-checked) by `export_onnx` in the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import platform
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from benchmarks.opencv_net import load_opencv_net
from converter.cli import main as converter_main
from converter.export.onnx import export_onnx, require_onnx
from converter.loading import load_model
from converter.synthetic.weights import CONFIGS, FILE_NAMES, write_synthetic_deeplab
from verify.inputs import caffe_preprocess, synthetic_image

FUSED = "fc_fusion"


def _prepare(work: Path, config_name: str, size: int) -> tuple[Path, Path, Path]:
    """The synthetic multi-scale test net and its converted checkpoint, written once per config and size."""
    folder = work / f"{config_name}_{size}"
    prototxt_name, caffemodel_name = FILE_NAMES["msc_test"]
    prototxt, caffemodel, checkpoint = folder / prototxt_name, folder / caffemodel_name, folder / "checkpoint"
    if not (prototxt.is_file() and caffemodel.is_file()):
        print(f"writing the synthetic {config_name} net into {folder} ...", flush=True)
        write_synthetic_deeplab(folder, "msc_test", CONFIGS[config_name](), input_size=(size, size))
    if not (checkpoint / "manifest.json").is_file():
        with contextlib.redirect_stdout(io.StringIO()):
            code = converter_main(["convert", "--caffemodel", str(caffemodel), "--prototxt", str(prototxt),
                                   "--out", str(checkpoint), "-q"])
        if code != 0:
            raise SystemExit(f"converting {caffemodel} failed")
    return prototxt, caffemodel, checkpoint


def _pass_seconds(forward: Callable[[np.ndarray], np.ndarray], blobs: list[np.ndarray]) -> float:
    """Seconds of one pass of `forward` over every image."""
    started = time.perf_counter()
    for blob in blobs:
        forward(blob)
    return time.perf_counter() - started


def _rate(forward: Callable[[np.ndarray], np.ndarray], blobs: list[np.ndarray], repeat: int) -> tuple[float, np.ndarray]:
    """Best images/s over `repeat` passes (after a warm-up pass) and the first image's output."""
    first = forward(blobs[0])
    _pass_seconds(forward, blobs[1:])
    return len(blobs) / min(_pass_seconds(forward, blobs) for _ in range(repeat)), first


def _pytorch(checkpoint: Path) -> Callable[[np.ndarray], np.ndarray]:
    model, _ = load_model(checkpoint)

    def forward(blob: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(blob)).fused.numpy()

    return forward


def _onnxruntime(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    _, ort = require_onnx()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda blob: session.run([FUSED], {name: blob})[0]


def _opencv(prototxt: Path, caffemodel: Path, blob: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """OpenCV dnn on the Caffe files (shrink_factor Interps given explicit sizes, which OpenCV needs), CPU."""
    net = load_opencv_net(prototxt, caffemodel, blob)

    def forward(image: np.ndarray) -> np.ndarray:
        net.setInput(image)
        return net.forward(FUSED)

    return forward


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_onnx", description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="resnet101")
    parser.add_argument("--size", type=int, default=321, help="square input size (aligned: 32k+1..32k+6)")
    parser.add_argument("--images", type=int, default=4, help="synthetic images")
    parser.add_argument("--repeat", type=int, default=2, help="timed passes (best)")
    parser.add_argument("--no-opencv", action="store_true", help="skip OpenCV dnn")
    parser.add_argument("--work", type=Path, default=Path("build/bench_onnx"), help="cache of the generated files")
    args = parser.parse_args(argv)
    prototxt, caffemodel, checkpoint = _prepare(args.work, args.config, args.size)
    onnx_path = args.work / f"{args.config}_{args.size}" / "deeplab.onnx"
    started = time.perf_counter()
    exported = export_onnx(checkpoint, onnx_path, size=(args.size, args.size))
    export_seconds = time.perf_counter() - started
    blobs = [caffe_preprocess(synthetic_image(args.size, args.size, seed=seed)) for seed in range(args.images)]

    runtimes: list[tuple[str, Callable[[np.ndarray], np.ndarray]]] = [
        ("PyTorch (this project, fp32, eager)", _pytorch(checkpoint)),
        (f"onnxruntime CPU (exported, opset {exported.opset})", _onnxruntime(onnx_path)),
    ]
    if not args.no_opencv:
        runtimes.append(("OpenCV dnn on the Caffe net", _opencv(prototxt, caffemodel, blobs[0])))
    rows = []
    for label, forward in runtimes:
        rate, first = _rate(forward, blobs, args.repeat)
        rows.append((label, rate, first))
    baseline_rate, baseline = rows[0][1], rows[0][2]
    scale = float(np.abs(baseline).max())

    print(f"\nbench-onnx: {args.config}, {args.size}x{args.size}, {args.images} synthetic images, batch 1, "
          f"best of {args.repeat} passes")
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), Python {platform.python_version()}")
    print(f"export: {export_seconds:.1f} s (trace + onnxruntime self-check, worst output at "
          f"{exported.worst.ratio:.2f}x its noise budget)")
    print("\n| runtime | images/s | x PyTorch | max abs diff from PyTorch / scale |\n|---|---|---|---|")
    for label, rate, first in rows:
        diff = float(np.abs(first.astype(np.float64) - baseline).max()) / scale if first.shape == baseline.shape else None
        shown = "-" if diff is None else f"{diff:.2e}"
        print(f"| {label} | {rate:.2f} | {rate / baseline_rate:.2f} | {shown} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
