"""The `export-onnx` and `export-caffe` subcommands of `python -m converter` (registered by converter.cli)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from converter.build_cli import name_value_pairs as define_pairs  # the build command's NAME=VALUE parsing
from converter.export.caffemodel import export_caffemodel
from converter.export.onnx import DEFAULT_OPSET, OUTPUT_CHOICES, export_onnx


def run_export_onnx(args: argparse.Namespace) -> None:
    """Checkpoint folder -> ONNX, checked with onnxruntime before it is written."""
    result = export_onnx(args.checkpoint, args.out, opset=args.opset, dynamic_size=args.dynamic_size,
                         outputs=args.outputs, size=tuple(args.size) if args.size else None)
    sizes = sorted({f"{c.size[0]}x{c.size[1]}" for c in result.checks})
    worst = result.worst
    print(f"exported {args.checkpoint} -> {result.path} (opset {result.opset}, outputs {', '.join(result.outputs)}, "
          f"{'dynamic aligned sizes' if result.dynamic_size else 'fixed size'})")
    print(f"onnxruntime check passed at {', '.join(sizes)}: worst '{worst.blob}' at {worst.size[0]}x{worst.size[1]} "
          f"max abs {worst.max_abs:.3g} = {worst.ratio:.2f}x its noise budget")
    print(f"  wrote {result.path} ({result.path.stat().st_size / 2**20:.1f} MiB) and {result.sidecar.name}; "
          f"done in {result.seconds:.1f} s")


def run_export_caffe(args: argparse.Namespace) -> None:
    """Checkpoint folder -> binary .caffemodel for a prototxt, checked by converting it back."""
    started = time.perf_counter()
    result = export_caffemodel(args.checkpoint, args.out, args.prototxt, define_pairs(args.define, "--define"))
    net = args.prototxt or "the net in its manifest"
    print(f"exported {args.checkpoint} -> {result.path} for {net}: {result.layers_written} layers, "
          f"{result.blobs_written} blobs")
    print(f"round trip: {result.tensors_compared} tensors identical after converting the file back "
          f"({result.bytes_compared / 2**20:.1f} MiB compared)")
    print(f"  wrote {result.path} ({result.path.stat().st_size / 2**20:.1f} MiB) and {result.sidecar.name}; "
          f"done in {time.perf_counter() - started:.1f} s")


def add_export_commands(commands: argparse._SubParsersAction) -> None:
    """Add `export-onnx` and `export-caffe` to the converter's subcommands."""
    onnx = commands.add_parser("export-onnx", help="checkpoint folder -> ONNX, checked with onnxruntime")
    onnx.add_argument("--checkpoint", required=True, type=Path, help="checkpoint folder written by this project")
    onnx.add_argument("--out", required=True, type=Path, help="the .onnx file to write (a sidecar .onnx.json beside)")
    onnx.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                      help=f"ONNX opset (default {DEFAULT_OPSET}: the first with Caffe's ceil-pooling rule)")
    onnx.add_argument("--dynamic-size", action="store_true",
                      help="any aligned input size (32k+1 .. 32k+6 per axis) instead of one fixed size")
    onnx.add_argument("--outputs", choices=OUTPUT_CHOICES, default="fused",
                      help="fused: the fused stride-8 score map (default); all: the four score maps")
    onnx.add_argument("--size", type=int, nargs=2, metavar=("H", "W"),
                      help="fixed input size (default: the recorded reference's, else 321 321)")
    onnx.set_defaults(run=run_export_onnx)

    caffe = commands.add_parser("export-caffe", help="checkpoint folder -> .caffemodel for a prototxt")
    caffe.add_argument("--checkpoint", required=True, type=Path, help="checkpoint folder written by this project")
    caffe.add_argument("--prototxt", type=Path, help="the net definition the weights are written for "
                       "(default: the one the checkpoint's manifest records)")
    caffe.add_argument("--define", action="append", metavar="NAME=VALUE", help="fill ${NAME} in the prototxt")
    caffe.add_argument("--out", required=True, type=Path, help="the .caffemodel to write (a sidecar .json beside)")
    caffe.set_defaults(run=run_export_caffe)
