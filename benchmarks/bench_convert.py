"""`make bench-convert`: time and peak memory of converting a full-size synthetic DeepLab-v2 caffemodel.

Measured in one run, each method in a fresh interpreter (benchmarks/memory.py), all on a
page cache warmed by one read of the file beforehand (caches are not dropped: shared machine):
  (a) the floor: read the file's bytes, sha256 them, write model.pth + model.safetensors +
      manifest.json (write_checkpoint) from a state dict already decoded before the clock;
  (b) what other converters do: protobuf parse of the whole file, then each blob decoded from
      protobuf's repeated field with (b1) `np.array(blob.data)` or (b2) `list(blob.data)`, then
      the rest of this project's convert command unchanged (only its reader is swapped), so the
      outputs are the same;
  (c) this project's `python -m converter convert`.
The methods run interleaved, round after round, so load from other work hits them alike.
Then, unless --skip-hdf5, a ~3 GiB Caffe HDF5 weights file (a wider ResNet-101, no 2 GiB cap)
is written and read blob by blob and converted, to show memory stays bounded.
Targets are printed as PASS/FAIL, never asserted: this is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import shutil
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import date
from pathlib import Path
from typing import Any

import google.protobuf
import h5py
import numpy as np
import torch

import converter.cli
from benchmarks.memory import Measurement, measure
from converter.checkpoint import MANIFEST_FILE, file_record, read_checkpoint, sha256_file, write_checkpoint
from converter.deeplab.names import tower_copy_names
from converter.caffe.netdesc import Layer, Net
from converter.synthetic.netspec import deeplab_net_param, deeplab_prototxt, kind_defaults
from converter.caffe.hdf5 import iter_hdf5_weights
from converter.caffe.schema import caffe_pb
from converter.synthetic.weights import CONFIGS, synthetic_blobs, write_synthetic_deeplab
from converter.caffe.hdf5 import write_hdf5_weights
from models.deeplab import DeepLabV2, ResNetConfig

_MODULE = "benchmarks.bench_convert"  # children import the methods by this name, even when run as __main__
MIB = 2**20
GIB = 2**30
KIND = "msc_test"
TOWERS = 3
TIME_TARGET = 1.3  # (c) wall time / (a) wall time
RSS_FILE_TARGET = 1.8  # (c) peak RSS / caffemodel size


# --------------------------------------------------------------------------- methods (run in the child)


def _convert_cli(weights: str, out: str, prototxt: str | None = None) -> None:
    """The project's `python -m converter convert` in this process; raises unless it exits 0."""
    argv = ["convert", "--caffemodel", weights, "--out", out, "--quiet"]
    if prototxt:
        argv += ["--prototxt", prototxt]
    code = converter.cli.main(argv)
    if code != 0:
        raise RuntimeError(f"python -m converter {' '.join(argv)} exited {code}")


def floor_method(caffemodel: str, out: str) -> Callable[[], dict[str, Any]]:
    """(a) Prepared: the converted state dict in memory and its manifest. Timed: read + sha256 + write.

    The read is the manifest's own chunked sha256 pass: every byte read once, nothing kept.
    """
    scratch = Path(out) / "prepare"
    _convert_cli(caffemodel, str(scratch))
    loaded, manifest = read_checkpoint(scratch)
    state_dict = {key: value.clone() for key, value in loaded.items()}  # owned memory, no file behind it
    del loaded
    shutil.rmtree(scratch)

    def timed() -> dict[str, Any]:
        manifest["inputs"]["caffemodel"] = file_record(caffemodel)  # one chunked read of every byte + sha256
        write_checkpoint(Path(out) / "checkpoint", state_dict, manifest)
        return {}

    return timed


def _blob_shape(blob: Any) -> tuple[int, ...]:
    """Caffe's shape rule: legacy num/channels/height/width when present, else `shape.dim`."""
    if blob.HasField("num") or blob.HasField("channels") or blob.HasField("height") or blob.HasField("width"):
        return (blob.num, blob.channels, blob.height, blob.width)
    return tuple(blob.shape.dim)


_DECODERS: dict[str, Callable[[Any], np.ndarray]] = {
    "np.array": lambda blob: np.array(blob.data, dtype=np.float32).reshape(_blob_shape(blob)),
    "list": lambda blob: np.asarray(list(blob.data), dtype=np.float32).reshape(_blob_shape(blob)),
}


def _parse_and_decode(path: str, decode: Callable[[Any], np.ndarray]) -> Net:
    """Whole-file protobuf parse, then every blob decoded element by element (what other converters do)."""
    with open(path, "rb") as stream:
        message = caffe_pb().NetParameter.FromString(stream.read())
    layers = []
    for param in message.layer:
        blobs = tuple(decode(blob) for blob in param.blobs)
        param.ClearField("blobs")
        layers.append(Layer(param.name, param.type, tuple(param.bottom), tuple(param.top), param, blobs))
    inputs = {name: tuple(shape.dim) for name, shape in zip(message.input, message.input_shape)}
    return Net(name=message.name, path=path, inputs=inputs, layers=tuple(layers))


def protobuf_method(caffemodel: str, out: str, decode: str) -> Callable[[], dict[str, Any]]:
    """(b) Timed: the convert command with its reader swapped for protobuf parse + per-element decode."""
    decoder = _DECODERS[decode]

    def load_net(weights: Any = None, prototxt: Any = None) -> Net:
        return _parse_and_decode(str(weights), decoder)

    def timed() -> dict[str, Any]:
        converter.cli.load_net = load_net
        _convert_cli(caffemodel, str(Path(out) / "checkpoint"))
        return {}

    return timed


def project_method(caffemodel: str, out: str, prototxt: str | None = None) -> Callable[[], dict[str, Any]]:
    """(c) Timed: `python -m converter convert` (load_net, convert_deeplab, surgery check, write_checkpoint)."""

    def timed() -> dict[str, Any]:
        _convert_cli(caffemodel, str(Path(out) / "checkpoint"), prototxt)
        return {}

    return timed


def hdf5_read_method(weights: str) -> Callable[[], dict[str, Any]]:
    """HDF5 (i) Timed: every blob through the project's streaming reader, each fully touched, then dropped."""

    def timed() -> dict[str, Any]:
        blobs = values = 0
        for _, arrays in iter_hdf5_weights(weights):
            for array in arrays:
                values += int(np.count_nonzero(array))  # reads every value of the blob
                blobs += 1
        return {"blobs": blobs, "nonzero": values}

    return timed


# --------------------------------------------------------------------------- preparing inputs


@dataclass(frozen=True)
class Method:
    """A row of the table: label, child entry point and its arguments."""

    label: str
    target: str
    kwargs: dict[str, Any]


def ensure_caffemodel(folder: Path, config_name: str, seed: int) -> tuple[Path, str]:
    """The synthetic msc_test caffemodel in `folder`, reused when its stamp and sha256 match; (path, sha256).

    Hashing the file also reads it once, which warms the page cache for every method.
    """
    stamp_path = folder / "stamp.json"
    stamp = {"kind": KIND, "config": config_name, "seed": seed}
    caffemodel = folder / "train_iter_20000.caffemodel"
    if stamp_path.is_file() and caffemodel.is_file():
        recorded = json.loads(stamp_path.read_text())
        digest = sha256_file(caffemodel)
        if recorded.get("sha256") == digest and {k: recorded.get(k) for k in stamp} == stamp:
            print(f"reusing {caffemodel} (sha256 {digest[:16]}... matches {stamp_path.name})")
            return caffemodel, digest
    print(f"generating the synthetic {KIND} caffemodel ({config_name}, seed {seed}) in {folder} ...", flush=True)
    files = write_synthetic_deeplab(folder, KIND, CONFIGS[config_name](), seed)
    stamp_path.write_text(json.dumps({**stamp, "sha256": files.sha256}, indent=2) + "\n")
    sha256_file(files.caffemodel)
    return files.caffemodel, files.sha256


def tower_bytes(config: ResNetConfig, num_classes: int = 21) -> int:
    """float32 bytes of one tower's weights (the model's state dict), computed on the meta device."""
    with torch.device("meta"):
        model = DeepLabV2(num_classes=num_classes, config=config)
    return sum(value.numel() * 4 for value in model.state_dict().values())


def widened_config(base: ResNetConfig, total_bytes: float, towers: int = TOWERS) -> ResNetConfig:
    """`base` with stem and widths scaled so that `towers` copies of its weights take about `total_bytes`."""
    scale = 1.0
    config = base
    for _ in range(6):  # weights grow as scale**2; a few fixed-point steps land within a percent
        scale *= math.sqrt(total_bytes / (towers * tower_bytes(config)))
        config = replace(
            base,
            stem_width=_round_width(base.stem_width * scale),
            widths=tuple(_round_width(w * scale) for w in base.widths),
        )
    return config


def _round_width(width: float) -> int:
    """Channel counts as nets use them: multiples of 8 once that wide, else at least 1."""
    return max(8, round(width / 8) * 8) if width >= 8 else max(1, round(width))


def _msc_weights(config: ResNetConfig, seed: int) -> Iterator[tuple[str, Sequence[np.ndarray]]]:
    """(layer, blobs) of the msc_test net in layer order: one tower drawn, its copies yielded again."""
    head_name, num_classes = kind_defaults(KIND)
    blobs = synthetic_blobs(config, seed, num_classes, head_name)
    source = {copy: layer for layer in blobs for copy in tower_copy_names(layer, head_name)}
    for layer in deeplab_net_param(KIND, config).layer:
        name = source.get(layer.name, layer.name)
        if name in blobs:
            yield layer.name, blobs[name]


def write_hdf5_net(folder: Path, config: ResNetConfig, seed: int) -> tuple[Path, Path]:
    """The msc_test prototxt and its Caffe HDF5 weights (streamed to disk) for `config`; (prototxt, weights)."""
    folder.mkdir(parents=True, exist_ok=True)
    prototxt = folder / "test.prototxt"
    prototxt.write_text(deeplab_prototxt(KIND, config))
    weights = folder / "train_iter_20000.caffemodel.h5"
    write_hdf5_weights(weights, _msc_weights(config, seed))
    return prototxt, weights


def largest_blob_bytes(weights: Path) -> int:
    """Size of the largest dataset in a Caffe HDF5 weights file (metadata only)."""
    largest = 0
    with h5py.File(weights, "r") as h5:
        for group in h5["data"].values():
            for dataset in group.values():
                largest = max(largest, dataset.size * dataset.dtype.itemsize)
    return largest


# --------------------------------------------------------------------------- reporting


def machine_lines() -> list[str]:
    """CPU model, cores, RAM and library versions, for the record."""
    info: dict[str, str] = {}
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
    cpu = f"{info.get('model name', 'unknown CPU')} (family {info.get('cpu family', '?')}, model {info.get('model', '?')})"
    if "hypervisor" in info.get("flags", "").split():
        cpu += ", virtual machine"
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return [
        f"machine: {cpu}, {os.cpu_count()} cores, {ram / GIB:.1f} GiB RAM, {platform.system()} {platform.release()}",
        f"python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}, "
        f"protobuf {google.protobuf.__version__} ({_protobuf_backend()}), h5py {h5py.__version__}",
        _load_line(),
    ]


def _load_line() -> str:
    """The 1-minute load average: other work on the machine skews every timing."""
    return f"load average (1 min): {os.getloadavg()[0]:.2f}"


def _protobuf_backend() -> str:
    from google.protobuf.internal import api_implementation

    return api_implementation.Type()


def _mib(value: float) -> str:
    return f"{value / MIB:,.0f}"


@dataclass(frozen=True)
class Row:
    """A method's runs: the fastest one (carrying the largest memory figures of all runs) and the median time."""

    label: str
    best: Measurement
    median_s: float


def print_table(rows: list[Row], floor_s: float, file_size: int) -> None:
    """Markdown table: wall time, peak RSS and its make-up, relative to the floor and to the file size."""
    print("| method | wall s (best) | median s | x floor | peak RSS MiB | x file | heap MiB | mapped-file MiB "
          "| held at start MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        m = row.best
        print(
            f"| {row.label} | {m.wall_s:.2f} | {row.median_s:.2f} | {m.wall_s / floor_s:.2f} | {_mib(m.peak_rss)} | "
            f"{m.peak_rss / file_size:.2f} | {_mib(m.peak_anon)} | {_mib(m.peak_file)} | {_mib(m.held_before)} |"
        )


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def run_rounds(methods: list[Method], repeat: int) -> tuple[list[Row], dict[str, str]]:
    """Each method once per round, `repeat` rounds, each run in a fresh interpreter.

    Interleaving the methods makes load from other work on the machine hit them alike. Returns
    the rows and, per method, the sha256 of the model.safetensors it wrote.
    """
    runs: dict[str, list[Measurement]] = {method.label: [] for method in methods}
    digests: dict[str, str] = {}
    for round_index in range(repeat):
        print(f"  round {round_index + 1}/{repeat}: " + ", ".join(m.label.split(" ", 1)[0] for m in methods), flush=True)
        for method in methods:
            out = Path(method.kwargs["out"])
            shutil.rmtree(out, ignore_errors=True)
            runs[method.label].append(measure(method.target, method.kwargs))
            digests[method.label] = _safetensors_digest(out)
            shutil.rmtree(out)
    rows = []
    for label, measured in runs.items():
        largest = {field: max(getattr(m, field) for m in measured)
                   for field in ("peak_rss", "peak_anon", "peak_file", "held_before")}
        best = replace(min(measured, key=lambda m: m.wall_s), **largest)
        rows.append(Row(label, best, float(np.median([m.wall_s for m in measured]))))
    return rows, digests


def _safetensors_digest(out: Path) -> str:
    manifest = json.loads((out / "checkpoint" / MANIFEST_FILE).read_text())
    return manifest["files"]["model.safetensors"]


def bench_caffemodel(workdir: Path, config_name: str, seed: int, repeat: int) -> None:
    """Methods (a), (b), (c) on the synthetic multi-scale caffemodel; table and targets."""
    caffemodel, digest = ensure_caffemodel(workdir / f"{KIND}_{config_name}_seed{seed}", config_name, seed)
    size = caffemodel.stat().st_size
    print(f"caffemodel: {caffemodel} ({size / MIB:,.1f} MiB, sha256 {digest[:16]}...), page cache warmed by one read")
    outputs = workdir / "out"
    methods = [
        Method("(a) floor: read + sha256 + write .pth/.safetensors/manifest", f"{_MODULE}:floor_method",
               {"caffemodel": str(caffemodel), "out": str(outputs / "floor")}),
        Method("(b1) protobuf parse + np.array(blob.data) per blob", f"{_MODULE}:protobuf_method",
               {"caffemodel": str(caffemodel), "out": str(outputs / "np_array"), "decode": "np.array"}),
        Method("(b2) protobuf parse + list(blob.data) per blob", f"{_MODULE}:protobuf_method",
               {"caffemodel": str(caffemodel), "out": str(outputs / "list"), "decode": "list"}),
        Method("(c) this project: python -m converter convert", f"{_MODULE}:project_method",
               {"caffemodel": str(caffemodel), "out": str(outputs / "project")}),
    ]
    rows, digests = run_rounds(methods, repeat)
    shutil.rmtree(outputs, ignore_errors=True)
    floor, np_array, _, project = (row.best for row in rows)
    print(_load_line())
    print()
    print_table(rows, floor.wall_s, size)
    print()
    same = len(set(digests.values())) == 1
    print(f"all methods wrote the same model.safetensors: {'yes' if same else 'NO'}")
    if not same:
        for label, digest in digests.items():
            print(f"  {digest[:16]}  {label}")
    time_ratio = project.wall_s / floor.wall_s
    median_ratio = rows[3].median_s / rows[0].median_s
    print(f"target (c) time within {TIME_TARGET}x of (a): {time_ratio:.2f}x (medians: {median_ratio:.2f}x)  "
          f"{verdict(time_ratio <= TIME_TARGET)}")
    print(
        f"target (c) peak RSS below the np.array method's: {_mib(project.peak_rss)} vs {_mib(np_array.peak_rss)} MiB  "
        f"{verdict(project.peak_rss < np_array.peak_rss)}"
    )
    rss_ratio = project.peak_rss / size
    print(f"target (c) peak RSS at most {RSS_FILE_TARGET}x the file: {rss_ratio:.2f}x  {verdict(rss_ratio <= RSS_FILE_TARGET)}")


def bench_hdf5(workdir: Path, base: ResNetConfig, gib: float, seed: int, keep: bool) -> None:
    """A ~`gib` GiB Caffe HDF5 weights file: (i) read every blob, (ii) convert; peak RSS of each."""
    config = widened_config(base, gib * GIB)
    folder = workdir / "hdf5"
    print(
        f"writing ~{gib:g} GiB of Caffe HDF5 weights: {KIND} net, blocks {list(config.blocks)}, "
        f"stem {config.stem_width}, widths {list(config.widths)} ...",
        flush=True,
    )
    try:
        prototxt, weights = write_hdf5_net(folder, config, seed)
        gc.collect()
        size = weights.stat().st_size
        largest = largest_blob_bytes(weights)
        sha256_file(weights)  # warm the page cache, as for the caffemodel
        print(f"hdf5 weights: {weights} ({size / GIB:.2f} GiB, largest blob {largest / MIB:,.1f} MiB)")
        print("  running (i) read every blob ...", flush=True)
        read = measure(f"{_MODULE}:hdf5_read_method", {"weights": str(weights)})
        print("  running (ii) convert (prototxt + HDF5 weights) ...", flush=True)
        out = folder / "out"
        conversion = measure(f"{_MODULE}:project_method", {"caffemodel": str(weights), "out": str(out),
                                                            "prototxt": str(prototxt)})
        output = (out / "checkpoint" / "model.safetensors").stat().st_size
        shutil.rmtree(out)
    finally:
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)
    print()
    print(f"| HDF5 {size / GIB:.2f} GiB | wall s | peak RSS MiB | heap MiB | mapped-file MiB | peak RSS / file |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, m in (("(i) read every blob", read), ("(ii) convert to a checkpoint", conversion)):
        print(f"| {label} | {m.wall_s:.1f} | {_mib(m.peak_rss)} | {_mib(m.peak_anon)} | {_mib(m.peak_file)} | "
              f"{m.peak_rss / size:.2f} |")
    print()
    read_bound = 2 * largest + 64 * MIB
    print(f"(i) peak RSS {_mib(read.peak_rss)} MiB vs largest blob {largest / MIB:,.1f} MiB: "
          f"bound 2x largest + 64 MiB = {_mib(read_bound)} MiB  {verdict(read.peak_rss <= read_bound)}")
    convert_bound = 1.25 * output + 256 * MIB
    print(f"(ii) peak RSS {_mib(conversion.peak_rss)} MiB vs output state dict {_mib(output)} MiB "
          f"(all {TOWERS} towers resident would be {_mib(TOWERS * output)} MiB): "
          f"bound 1.25x output + 256 MiB = {_mib(convert_bound)} MiB  {verdict(conversion.peak_rss <= convert_bound)}")
    print(f"(ii) heap only: {_mib(conversion.peak_anon)} MiB  {verdict(conversion.peak_anon <= convert_bound)}")
    if not keep:
        print(f"removed {folder} (use --keep to keep it)")


def check_free_space(folder: Path, min_free_gib: float) -> None:
    """Stop with a clear message unless `folder`'s file system has `min_free_gib` GiB free."""
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free < min_free_gib * GIB:
        raise SystemExit(
            f"error: {folder} has {free / GIB:.1f} GiB free; the benchmark needs {min_free_gib:g} GiB "
            "(free space, use --workdir elsewhere, or --skip-hdf5 and a lower --min-free-gib)"
        )


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: run the conversion benchmark and print its tables and targets."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_convert", description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="resnet101", help="network size (default resnet101)")
    parser.add_argument("--workdir", type=Path, default=Path("build/bench"), help="where files are written")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic weights")
    parser.add_argument("--repeat", type=int, default=5, help="runs of each method (fastest time, largest memory)")
    parser.add_argument("--hdf5-gib", type=float, default=3.0, help="size of the HDF5 weights file (default 3)")
    parser.add_argument("--skip-hdf5", action="store_true", help="skip the HDF5 part")
    parser.add_argument("--keep", action="store_true", help="keep the HDF5 files afterwards")
    parser.add_argument("--min-free-gib", type=float, default=12.0, help="free disk required (default 12)")
    arguments = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(arguments)
    check_free_space(args.workdir, args.min_free_gib)
    print(f"bench-convert {date.today().isoformat()}: python -m benchmarks.bench_convert {' '.join(arguments)}")
    for line in machine_lines():
        print(line)
    bench_caffemodel(args.workdir, args.config, args.seed, args.repeat)
    if not args.skip_hdf5:
        print()
        bench_hdf5(args.workdir, CONFIGS[args.config](), args.hdf5_gib, args.seed, args.keep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
