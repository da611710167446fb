"""`make bench-verify`: the whole parity verification against one plain fp32 forward, on the CPU.

Builds (once, cached in --work) the synthetic multi-scale DeepLab-v2 net, converts it, and
produces its OpenCV reference with every blob at --size. Then, in one process: the plain
float32 forward of DeepLabV2MSC (median of --repeat runs after a warm-up), and the whole
verification (`verify_state_dict`: model build, float32 capture, float64 pass, comparison
and teacher forcing; plus writing the report). Target: verification <= 10x the forward.
Prints a table; the target is reported, never asserted: this is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import torch

from converter.deeplab.convert import convert_deeplab
from converter.caffe.load import load_net
from converter.caffe.prototxt import read_prototxt
from converter.synthetic.weights import CONFIGS, FILE_NAMES, write_synthetic_deeplab
from verify.activations import read_activations
from verify.compare import ModelSpec, load_model, verify_state_dict
from verify.opencv_reference import default_feed, produce_opencv_reference
from verify.report import write_report

TARGET = 10.0


def _prepare(work: Path, config_name: str, size: int) -> tuple[Path, Path]:
    """The synthetic MSC test net's files and its full OpenCV reference, made once per config and size."""
    folder = work / f"{config_name}_{size}"
    prototxt_name, caffemodel_name = FILE_NAMES["msc_test"]
    prototxt, caffemodel = folder / prototxt_name, folder / caffemodel_name
    if not (prototxt.is_file() and caffemodel.is_file()):
        print(f"writing the synthetic {config_name} net at {size}x{size} into {folder} ...", flush=True)
        write_synthetic_deeplab(folder, "msc_test", CONFIGS[config_name](), input_size=(size, size))
    reference = folder / "reference_opencv.h5"
    if not reference.is_file():
        print("producing the OpenCV reference (every blob) ...", flush=True)
        produce_opencv_reference(prototxt, caffemodel, default_feed(read_prototxt(prototxt)), reference)
    return caffemodel, reference


def _plain_forward_seconds(model: torch.nn.Module, data: torch.Tensor, repeat: int) -> float:
    with torch.no_grad():
        model(data)  # warm-up: first-call allocations and kernel selection
        times = []
        for _ in range(repeat):
            started = time.perf_counter()
            model(data)
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_verify", description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="resnet101")
    parser.add_argument("--size", type=int, default=321, help="input height and width (default 321)")
    parser.add_argument("--work", type=Path, default=Path("build/bench_verify"), help="cache of the generated files")
    parser.add_argument("--repeat", type=int, default=3, help="timed plain forwards (median)")
    args = parser.parse_args(argv)

    caffemodel, reference_path = _prepare(args.work, args.config, args.size)
    converted = convert_deeplab(load_net(weights=caffemodel, prototxt=caffemodel.with_name(FILE_NAMES["msc_test"][0])))
    spec = ModelSpec(converted.config, converted.num_classes, converted.bn_eps)
    with read_activations(reference_path) as reference:
        data = torch.from_numpy(reference.inputs["data"])
        blob_count = len(reference.order)
        model = load_model(converted.state_dict, spec, multi_scale=True, source=str(caffemodel))
        forward = _plain_forward_seconds(model, data, args.repeat)
        del model
        started = time.perf_counter()
        result = verify_state_dict(converted.state_dict, spec, reference, source=str(caffemodel))
        with tempfile.TemporaryDirectory() as report_dir:
            clock = time.perf_counter()
            write_report(result, report_dir)
            report_seconds = time.perf_counter() - clock
        total = time.perf_counter() - started

    stages = [("plain fp32 forward (median)", forward)]
    stages += [(f"  verify: {name}", seconds) for name, seconds in result.timings.items()]
    stages += [("  verify: write report", report_seconds), ("whole verification", total)]
    print(f"\nbench-verify: {args.config} at {args.size}x{args.size}, {blob_count} reference blobs, "
          f"verdict {result.verdict.upper()}")
    print(f"machine: {platform.machine()} {platform.processor() or ''}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}, Python {platform.python_version()}")
    print("\n| stage | seconds | x fp32 forward |\n|---|---|---|")
    for name, seconds in stages:
        print(f"| {name} | {seconds:.2f} | {seconds / forward:.2f} |")
    ratio = total / forward
    print(f"\nwhole verification = {ratio:.1f}x one fp32 forward (target <= {TARGET:g}x): "
          f"{'PASS' if ratio <= TARGET else 'FAIL'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
