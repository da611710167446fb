"""`make bench-registry`: the layer registry's DeepLab-v2 module against the hand-written one, same run.

On a synthetic multi-scale DeepLab-v2 caffemodel in the real Caffe format (ResNet-101 by default):
  - build time: `build_net` on the net already parsed by `load_net` (prototxt + caffemodel), the
    first build in the process (cold) and the median of the next ones (warm); the parse itself is
    shown too. Target: under 1 s.
  - forward: the built CaffeNet (data -> fc1_interp) against DeepLabV2MSC with the conversion's
    weights plus the same zoom-8 Interp, at 321x321 on the CPU, no_grad, interleaved rounds,
    medians. Target: the built module within 1.1x of the hand-written model's time.
Both produce the same fc1_interp (checked before timing). Targets are printed as PASS/FAIL,
never asserted: this is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from datetime import date
from pathlib import Path

import torch
from tqdm import tqdm

from converter.caffe.load import load_net
from converter.deeplab.convert import convert_deeplab
from converter.layers import build_net
from converter.synthetic.weights import CONFIGS, calibration_image, write_synthetic_deeplab
from models.deeplab import DeepLabV2MSC
from models.interp import CaffeInterp
from models.alignment import TEST_ZOOM

BUILD_TARGET_S = 1.0
FORWARD_TARGET = 1.1


def _median_seconds(run: Callable[[], object], rounds: int) -> list[float]:
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return times


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_registry", description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="resnet101", help="backbone size (default resnet101)")
    parser.add_argument("--size", type=int, default=321, help="input height and width (default 321)")
    parser.add_argument("--rounds", type=int, default=5, help="timed forward rounds per model (default 5)")
    parser.add_argument("--builds", type=int, default=3, help="warm builds timed after the cold one (default 3)")
    parser.add_argument("--workdir", type=Path, default=Path("build/bench_registry"), help="where the caffemodel goes")
    args = parser.parse_args(argv)
    config = CONFIGS[args.config]()
    size = (args.size, args.size)

    folder = args.workdir / args.config
    started = time.perf_counter()
    files = write_synthetic_deeplab(folder, "msc_test", config, seed=0, input_size=size)
    written = time.perf_counter() - started

    started = time.perf_counter()
    net = load_net(files.caffemodel, files.prototxt)
    parse = time.perf_counter() - started
    started = time.perf_counter()
    built = build_net(net)
    cold = time.perf_counter() - started
    warm = statistics.median(_median_seconds(lambda: build_net(net), args.builds)) if args.builds else float("nan")

    converted = convert_deeplab(net)
    model = DeepLabV2MSC(converted.num_classes, converted.config, converted.bn_eps, align="strict")
    model.load_state_dict(converted.state_dict)
    model.eval()
    zoom = CaffeInterp(**TEST_ZOOM)
    image = torch.from_numpy(calibration_image(*size, seed=1))

    def hand_written() -> torch.Tensor:
        return zoom(model(image).fused)

    def registry() -> torch.Tensor:
        return built(data=image)["fc1_interp"]

    threads = torch.get_num_threads()
    with torch.no_grad():
        same = torch.equal(hand_written(), registry())  # also the warm-up of both
        times: dict[str, list[float]] = {"hand-written DeepLabV2MSC": [], "registry CaffeNet": []}
        for _ in tqdm(range(args.rounds), desc="forward rounds", unit="round"):
            times["hand-written DeepLabV2MSC"] += _median_seconds(hand_written, 1)
            times["registry CaffeNet"] += _median_seconds(registry, 1)
    base, ours = (statistics.median(t) for t in times.values())
    ratio = ours / base

    print(f"# bench-registry, {date.today()}, {platform.processor() or platform.machine()}, "
          f"{threads} torch threads, torch {torch.__version__}, config {args.config}, input {args.size}x{args.size}")
    print(f"synthetic msc_test caffemodel written in {written:.1f} s ({files.caffemodel.stat().st_size / 2**20:.0f} MiB); "
          f"{len(built.graph.layers)} layers run")
    print()
    print("| step | seconds | target |")
    print("|---|---|---|")
    print(f"| load_net (parse prototxt + caffemodel) | {parse:.3f} | - |")
    print(f"| build_net, cold (first in the process) | {cold:.3f} | < {BUILD_TARGET_S:g} s: {'PASS' if cold < BUILD_TARGET_S else 'FAIL'} |")
    print(f"| build_net, warm (median of {args.builds}) | {warm:.3f} | < {BUILD_TARGET_S:g} s: {'PASS' if warm < BUILD_TARGET_S else 'FAIL'} |")
    for name, values in times.items():
        print(f"| forward {name} (median of {args.rounds}; min {min(values):.3f}) | {statistics.median(values):.3f} | - |")
    print(f"| forward ratio registry / hand-written | {ratio:.3f} | <= {FORWARD_TARGET:g}: {'PASS' if ratio <= FORWARD_TARGET else 'FAIL'} |")
    print()
    print(f"outputs identical: {same}; registry forward {ratio:.2f}x the hand-written model, build {cold:.2f} s cold / {warm:.2f} s warm")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
