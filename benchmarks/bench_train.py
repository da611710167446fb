"""`make bench-train`: training throughput of (a) the earlier port's configuration against (b) this trainer's
fast defaults, in one run, plus the data loader alone.

(a) fp32, PyTorch's defaults (TF32 convolutions on, as cuDNN's default), batch 1 per forward x iter_size 10.
(b) the trainer's fast defaults for the device: on CUDA batch 10 x iter_size 1, bf16 autocast,
    channels_last, frozen BN as one multiply-add, torch.compile; on the CPU the same without compile.
Each is measured in a fresh interpreter (benchmarks.memory): images/s over --updates updates after
--warmup untimed ones, peak memory (CUDA: max allocated; CPU: peak RSS above the imports), and on
CUDA the achieved fraction of the device's dense bf16 peak. The loader alone reads and augments the
demo dataset at crop 321 in --workers processes. Numbers are reported, never asserted.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from benchmarks.memory import measure
from models.deeplab import DeepLabV2MSC, ResNetConfig
from segmentation.data import read_list
from segmentation.demo_data import DemoSpec, write_demo_dataset
from segmentation.solver import CaffeSGD, SolverConfig, param_groups
from segmentation.train import train_one_update
from segmentation.train_config import SpeedOptions
from segmentation.train_data import SlotSampler, TrainSlots, make_loader
from segmentation.train_net import default_mults
from segmentation.train_speed import fold_frozen_batchnorm
from segmentation.transforms import TransformParams

CONFIGS = {"tiny": ResNetConfig.tiny, "resnet101": ResNetConfig.resnet101}
EFFECTIVE_BATCH = 10
SCHEDULE_IMAGES = 20000 * EFFECTIVE_BATCH  # the release's schedule
# Dense bf16 peak (no sparsity) of the devices the project is lent, in FLOP/s.
BF16_PEAK = {"H200": 989.4e12, "H100": 989.4e12}


def _device(name: str) -> torch.device:
    return torch.device("cuda" if name == "auto" and torch.cuda.is_available() else ("cpu" if name == "auto" else name))


def _slots(data: str, crop: int) -> TrainSlots:
    samples = read_list(Path(data) / "list" / "train.txt", data)
    return TrainSlots(samples, TransformParams(crop_height=crop, crop_width=crop), num_classes=21, seed=0)


def prepare_training(
    *, config: str, crop: int, data: str, device: str, batch_size: int, speed: dict[str, Any], warmup: int, updates: int,
    threads: int | None = None,
) -> Callable[[], dict[str, Any]]:
    """Model, solver and loader of one configuration, `warmup` updates run; returns the timed updates."""
    if threads:
        torch.set_num_threads(threads)
    options = SpeedOptions(**speed)
    target = _device(device)
    torch.manual_seed(0)
    model = DeepLabV2MSC(num_classes=21, config=CONFIGS[config]()).to(target)
    if options.fold_bn:
        fold_frozen_batchnorm(model)
    if options.channels_last:
        model.to(memory_format=torch.channels_last)
    iter_size = EFFECTIVE_BATCH // batch_size
    solver = SolverConfig()
    optimizer = CaffeSGD(param_groups(model, default_mults(model)), momentum=solver.momentum, weight_decay=solver.weight_decay, iter_size=iter_size)
    runner = torch.compile(model) if options.compile else model
    sampler = SlotSampler(0, warmup + updates, batch_size=batch_size, iter_size=iter_size, world_size=1, rank=0)
    loader = make_loader(_slots(data, crop), sampler, batch_size=batch_size, workers=options.workers, pin_memory=target.type == "cuda")
    batches = iter(loader)

    def run(count: int, first: int) -> None:
        for update in range(first, first + count):
            train_one_update(runner, optimizer, batches, rate=solver.rate(update), iter_size=iter_size, ignore_label=255, device=target, speed=options)
        if target.type == "cuda":
            torch.cuda.synchronize()

    run(warmup, 0)
    if target.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def timed() -> dict[str, Any]:
        started = time.perf_counter()
        run(updates, warmup)
        seconds = time.perf_counter() - started
        result = {"images_per_s": updates * EFFECTIVE_BATCH / seconds}
        if target.type == "cuda":
            result["cuda_peak_bytes"] = torch.cuda.max_memory_allocated()
        return result

    return timed


def prepare_loader(*, data: str, crop: int, workers: int, batches: int, batch_size: int) -> Callable[[], dict[str, Any]]:
    """The training DataLoader alone (read, augment, collate) over `batches` batches."""
    sampler = SlotSampler(0, batches, batch_size=batch_size, iter_size=1, world_size=1, rank=0)
    loader = make_loader(_slots(data, crop), sampler, batch_size=batch_size, workers=workers, pin_memory=False)

    def timed() -> dict[str, Any]:
        started = time.perf_counter()
        count = sum(len(images) for images, _ in loader)
        return {"images_per_s": count / (time.perf_counter() - started)}

    return timed


def flops_per_image(config: str, crop: int) -> float:
    """Forward + backward FLOPs of one crop through the multi-scale model (torch's flop counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = DeepLabV2MSC(num_classes=21, config=CONFIGS[config]())
    with FlopCounterMode(display=False) as counter:
        out = model(torch.zeros(1, 3, crop, crop))
        (out.fused.sum() + out.full.sum() + out.scale075.sum() + out.scale05.sum()).backward()
    return float(counter.get_total_flops())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=["auto", *CONFIGS], default="auto", help="auto: resnet101 on CUDA, tiny on the CPU")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument("--crop", type=int, default=321)
    parser.add_argument("--updates", type=int, default=3, help="timed updates of 10 images each")
    parser.add_argument("--warmup", type=int, default=1, help="untimed updates first (compile, allocator)")
    parser.add_argument("--workers", type=int, default=None, help="loader processes (default: 8 on CUDA, 2 on CPU)")
    parser.add_argument("--data", help="dataset root with list/train.txt (default: a generated demo set, VOC-sized images)")
    parser.add_argument("--threads", type=int, help="CPU threads of the training processes (default: torch's)")
    args = parser.parse_args(argv)
    device = _device(args.device)
    on_gpu = device.type == "cuda"
    config = args.config if args.config != "auto" else ("resnet101" if on_gpu else "tiny")
    workers = args.workers if args.workers is not None else (8 if on_gpu else 2)
    with tempfile.TemporaryDirectory(prefix="bench-train-") as scratch:
        data = args.data or str(Path(scratch) / "demo")
        if not args.data:
            write_demo_dataset(data, DemoSpec(train=48, val=1, min_size=300, max_size=500))
        common = {
            "config": config, "crop": args.crop, "data": data, "device": str(device),
            "warmup": args.warmup, "updates": args.updates, "threads": args.threads,
        }  # fmt: skip
        earlier = SpeedOptions(workers=workers)
        fast = SpeedOptions(bf16=True, channels_last=True, fold_bn=True, compile=on_gpu, workers=workers)
        rows = []
        for name, batch, speed in (("(a) earlier port: fp32, batch 1 x iter 10", 1, earlier), (f"(b) fast: bf16, channels_last, folded BN{', compile' if on_gpu else ''}, batch 10", EFFECTIVE_BATCH, fast)):
            m = measure("benchmarks.bench_train:prepare_training", {**common, "batch_size": batch, "speed": speed.__dict__})
            rows.append((name, m.result["images_per_s"], m.result.get("cuda_peak_bytes", m.peak_rss)))
        loader = measure("benchmarks.bench_train:prepare_loader", {"data": data, "crop": args.crop, "workers": workers, "batches": 20, "batch_size": EFFECTIVE_BATCH})
    flops = flops_per_image(config, args.crop)
    name = torch.cuda.get_device_name(device) if on_gpu else f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores"
    peak = next((value for key, value in BF16_PEAK.items() if key in name), None) if on_gpu else None
    memory_kind = "CUDA max allocated" if on_gpu else "peak RSS above imports"
    print(f"bench-train: {config} DeepLab-v2 MSC, crop {args.crop}, effective batch {EFFECTIVE_BATCH}, {args.updates} timed updates")
    threads = args.threads or torch.get_num_threads()
    print(f"device: {name}; torch {torch.__version__}; python {sys.version.split()[0]}; {threads} CPU threads per process")
    print(f"| configuration | images/s | vs (a) | {memory_kind} | 20000x10 schedule | bf16 peak fraction |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for label, images_per_s, memory in rows:
        fraction = f"{flops * images_per_s / peak:.1%}" if peak else "n/a"
        hours = SCHEDULE_IMAGES / images_per_s / 3600
        print(f"| {label} | {images_per_s:.1f} | {images_per_s / rows[0][1]:.2f}x | {memory / 2**20:.0f} MiB | {hours:.2f} h | {fraction} |")
    print(f"| loader alone ({workers} workers, crop {args.crop}) | {loader.result['images_per_s']:.1f} | | | | |")
    print(f"model: {flops / 1e9:.2f} GFLOP per image (forward + backward)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
