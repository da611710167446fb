"""Command line: `python -m verify --checkpoint DIR [--reference REF.h5 | --prototxt P --caffemodel W] ...`.

Verifies a converted checkpoint against a reference-activations file, writes report.md,
report.json and errors.png, and records the verdict in the checkpoint's manifest. Without
--reference it first produces the OpenCV reference (from --prototxt/--caffemodel, by default
the files the checkpoint was converted from) into the report folder. A checkpoint written by
`python -m converter build` (arch caffe_net) is verified through the layer registry; without
--checkpoint, --prototxt + --caffemodel + --reference build any supported net in memory and
verify it (report in --report-dir, default build/parity/<net name>/; nothing recorded).
--onnx FILE --reference REF.h5 verifies an exported ONNX graph end to end on the blobs it outputs
(verify/onnx.py; report beside the file, verdict in its sidecar JSON).
Exit codes: 0 parity holds, 1 parity fails, 2 bad input (one line `error: ...` on stderr).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from converter.atomic import write_atomic
from converter.checkpoint import manifest_path, read_checkpoint, sha256_file
from converter.loading import deeplab_entry
from converter.caffe.params import DEFAULT_BN_EPS
from converter.deeplab.names import config_from_state_dict
from converter.errors import CaffeError
from converter.caffe.prototxt import read_prototxt
from verify.activations import read_activations
from converter.layers import ARCH as CAFFE_NET_ARCH
from converter.loading import build_model
from verify.compare import ModelSpec, torch_device, verify_state_dict
from verify.generic import run_without_checkpoint, verify_caffe_net
from verify.onnx import run_onnx
from verify.opencv_reference import default_feed, produce_opencv_reference
from verify.report import summary_line, write_report
from verify.verdict import parity_record, record_parity

EXIT_PASS, EXIT_FAIL, EXIT_BAD_INPUT = 0, 1, 2
REPORT_SUBDIR = "parity"
REFERENCE_FILE = "reference_opencv.h5"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m verify", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="checkpoint folder written by the converter")
    parser.add_argument("--onnx", type=Path, help="verify this exported ONNX file (with --reference) "
                        "instead of a checkpoint, end to end on the blobs the graph outputs")
    parser.add_argument("--reference", type=Path,
                        help="reference-activations HDF5 to verify against (its own /inputs are fed)")
    parser.add_argument("--prototxt", type=Path, help="net to run in OpenCV when no --reference is given "
                        "(default: the checkpoint's source prototxt)")
    parser.add_argument("--caffemodel", type=Path, help="weights for OpenCV (default: the checkpoint's source)")
    parser.add_argument("--image", type=Path, help="picture to feed the OpenCV reference (default: the "
                        "deterministic synthetic image at the net's input size)")
    parser.add_argument("--device", default="cpu", help="where PyTorch runs: cpu or cuda (default cpu)")
    parser.add_argument("--report-dir", type=Path, help=f"report folder (default: <checkpoint>/{REPORT_SUBDIR}, or "
                        "build/parity/<net name>/ without a checkpoint)")
    parser.add_argument("--blobs", nargs="+", help="compare only these reference blobs (names, or comma lists)")
    parser.add_argument("--no-drift", action="store_true", help="on CUDA, skip the TF32/bf16 drift information")
    parser.add_argument("--allow-partial", action="store_true",
                        help="accept a reference that leaves whole stages of the model out (the report lists them)")
    parser.add_argument("--define", action="append", metavar="NAME=VALUE",
                        help="without --checkpoint: fill ${NAME} in --prototxt")
    parser.add_argument("--plugin", action="append", metavar="MODULE",
                        help="without --checkpoint: import MODULE to register custom layer converters")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    return parser


def run(args: argparse.Namespace) -> int:
    """Verify, report, record; returns the exit code (CaffeError propagates for bad input)."""
    if args.onnx is not None:
        return run_onnx(args)
    started = time.perf_counter()
    torch_device(args.device)  # a bad --device fails before any reference is produced
    args.blob_list = None if not args.blobs else [n for item in args.blobs for n in item.split(",") if n]
    if args.checkpoint is None:
        if not (args.prototxt and args.caffemodel and args.reference):
            raise CaffeError("give --checkpoint, or --prototxt, --caffemodel and --reference (or --onnx with --reference)")
        result, default_dir = run_without_checkpoint(args)
        return _report(result, args.report_dir or default_dir, None, started)
    checkpoint_dir = args.checkpoint if args.checkpoint.is_dir() else args.checkpoint.parent
    state_dict, manifest = read_checkpoint(args.checkpoint)
    built = (manifest.get("model") or {}).get("arch") == CAFFE_NET_ARCH  # `python -m converter build` folders
    spec = None if built else _model_spec(manifest, state_dict, manifest_path(args.checkpoint))
    scope = "backbone" if _head_replaced(manifest) else "full"
    report_dir = args.report_dir or checkpoint_dir / REPORT_SUBDIR
    if args.reference is not None:
        if args.image or args.prototxt or args.caffemodel:
            raise CaffeError("--reference brings its own input and net; drop --image/--prototxt/--caffemodel")
        reference_path = args.reference
    else:
        reference_path = _produce_reference(args, manifest, checkpoint_dir, report_dir)
    with read_activations(reference_path) as reference:
        if built:
            model = build_model(manifest, state_dict, source=args.checkpoint)
            result = verify_caffe_net(model, reference, device=args.device, blobs=args.blob_list)
        else:
            result = verify_state_dict(
                state_dict, spec, reference, source=str(args.checkpoint), device=args.device, blobs=args.blob_list,
                scope=scope, drift=False if args.no_drift else None, allow_partial=args.allow_partial,
            )
    record_parity(checkpoint_dir, parity_record(result, sha256_file(reference_path)))
    return _report(result, report_dir, checkpoint_dir, started)


def _report(result: Any, report_dir: Path, checkpoint_dir: Path | None, started: float) -> int:
    """Write the report, print the summary; the exit code of the verdict."""
    files = write_report(result, report_dir)
    print(summary_line(result))
    for name, seconds in result.timings.items():
        print(f"  {name}: {seconds:.2f} s")
    recorded = f"verdict recorded in {checkpoint_dir / 'manifest.json'}" if checkpoint_dir else "no checkpoint: nothing recorded"
    print(f"report: {files.markdown} ({files.json.name}, {files.plot.name}); {recorded}; "
          f"{time.perf_counter() - started:.1f} s in all")
    return EXIT_PASS if result.passed else EXIT_FAIL


def _model_spec(manifest: dict[str, Any], state_dict: dict[str, Any], manifest_file: Path) -> ModelSpec:
    """The model the checkpoint was made for: from the manifest, else from the state dict's shapes."""
    model = manifest.get("model") or {}
    if "config" in model or "num_classes" in model:
        return ModelSpec(*deeplab_entry(model, manifest_file))
    config, num_classes = config_from_state_dict(state_dict)
    return ModelSpec(config, num_classes, float(model.get("bn_eps", DEFAULT_BN_EPS)))


def _head_replaced(manifest: dict[str, Any]) -> bool:
    surgery = manifest.get("surgery")
    return bool(surgery) and not surgery.get("kept", False)


def _produce_reference(args: argparse.Namespace, manifest: dict[str, Any], checkpoint_dir: Path, report_dir: Path) -> Path:
    """Run the OpenCV oracle on the checkpoint's (or the given) Caffe files into the report folder."""
    inputs = manifest.get("inputs") or {}
    caffemodel = args.caffemodel or _recorded_source(inputs.get("caffemodel"), "caffemodel")
    prototxt = args.prototxt or _recorded_source(inputs.get("prototxt"), "prototxt")
    if caffemodel is None:
        raise CaffeError("no --reference, and the manifest names no source caffemodel: give --caffemodel",
                         path=checkpoint_dir)
    created = not report_dir.exists()
    report_dir.mkdir(parents=True, exist_ok=True)
    try:
        if prototxt is None:
            text = manifest.get("prototxt_text")
            if not text:
                raise CaffeError("no --prototxt, and the manifest holds no net definition", path=checkpoint_dir)
            prototxt = write_atomic(report_dir / "net.prototxt", lambda path: path.write_text(text, encoding="utf-8"))
        for path, what in ((caffemodel, "caffemodel"), (prototxt, "prototxt")):
            if not path.is_file():
                raise CaffeError(f"{what} does not exist (needed to produce the OpenCV reference)", path=path)
        feeds = default_feed(read_prototxt(prototxt), args.image)
        out = report_dir / REFERENCE_FILE
        print(f"producing the OpenCV reference from {prototxt} + {caffemodel} -> {out}")
        return produce_opencv_reference(prototxt, caffemodel, feeds, out)
    except BaseException:
        if created:  # a failed run leaves no report folder behind
            shutil.rmtree(report_dir, ignore_errors=True)
        raise


def _recorded_source(record: dict[str, Any] | None, what: str) -> Path | None:
    """A source file the manifest names, checked to be the very file that was converted."""
    if not record:
        return None
    path = Path(record["path"])
    if not path.is_file():
        raise CaffeError(f"{what} the checkpoint was converted from does not exist (give --{what})", path=path)
    if sha256_file(path) != record["sha256"]:
        raise CaffeError(f"{what} changed since the checkpoint was converted (sha256 differs from the manifest's); "
                         f"give --{what} or --reference", path=path)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code (0 pass, 1 parity failure, 2 bad input)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return run(args)
    except CaffeError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as error:  # e.g. a report folder that cannot be created: bad input, not a parity failure
        print(f"error: {error.filename or args.checkpoint}: {error.strerror or error}", file=sys.stderr)
        return EXIT_BAD_INPUT

