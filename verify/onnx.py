"""Verify an exported ONNX file against a reference-activations file, end to end on the blobs the graph outputs.

onnxruntime (CPU) runs the graph on the reference's own input; each graph output whose Caffe name
the reference holds is compared with it. The budget is the verifier's end-to-end rule: 10 x that
blob's PyTorch float32-vs-float64 error on the same input, at least 4 float32 ulps of its scale;
the float32/float64 runs come from the checkpoint the ONNX file was exported from (named in its
sidecar JSON, or given). A graph has no intermediate blobs to feed, so there is no teacher forcing.
The report has the checkpoint verifier's format; the verdict is recorded in the ONNX file's sidecar.
"""

from __future__ import annotations

import argparse
import copy
import logging
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from converter.checkpoint import sha256_file
from converter.errors import CaffeError, listed
from converter.export.onnx import checkpoint_graph, pytorch_values, require_onnx, run_session
from converter.export.record import read_sidecar, sidecar_path, write_sidecar
from verify.activations import ActivationsFile, read_activations
from verify.budget import NoiseBudget, error_stats
from verify.compare import BUDGET_FACTOR, END_TO_END_FLOOR, TEACHER_FLOOR
from verify.report import summary_line, write_report
from verify.result import FAIL, PASS, BlobRow, Scheme, VerificationResult, verification_result

log = logging.getLogger(__name__)

SCHEME = Scheme(
    budget_factor=BUDGET_FACTOR,
    floor=END_TO_END_FLOOR,
    teacher=TEACHER_FLOOR,
    description=(
        "End to end only (a graph has no intermediate blobs to feed): each blob the ONNX graph outputs may "
        f"differ from the reference by {BUDGET_FACTOR:g} x its own PyTorch float32-vs-float64 error (max abs and "
        "mean abs, each; from the source checkpoint on the same input), at least 4 float32 ulps of its scale."
    ),
)


def source_checkpoint(onnx_path: Path, checkpoint: Path | None) -> Path:
    """The checkpoint the ONNX file was exported from: given, else the one its sidecar names (and still holds)."""
    if checkpoint is not None:
        return checkpoint
    record = read_sidecar(onnx_path)
    if record is None:
        raise CaffeError("no sidecar .onnx.json names the source checkpoint (the noise budget needs it); "
                         "give --checkpoint", path=onnx_path)
    folder = Path(record["source"]["checkpoint"])
    if not folder.is_dir():
        raise CaffeError(f"the source checkpoint {folder} named by the sidecar is gone; give --checkpoint",
                         path=onnx_path)
    return folder


def verify_onnx(
    onnx_path: str | Path,
    reference: ActivationsFile,
    *,
    checkpoint: str | Path | None = None,
    blobs: Sequence[str] | None = None,
) -> VerificationResult:
    """Run the ONNX graph in onnxruntime on the reference's input and judge each output blob the reference holds."""
    _, ort = require_onnx()
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise CaffeError("no such ONNX file", path=onnx_path)
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    try:
        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime raises its own types for a file that is not a loadable model
        raise CaffeError(f"onnxruntime cannot load it: {str(error).splitlines()[0]}", path=onnx_path) from None
    outputs = [output.name for output in session.get_outputs()]
    wanted = outputs if blobs is None else [name for name in outputs if name in set(blobs)]
    compared = [name for name in wanted if name in reference]
    if not compared:
        raise CaffeError(f"the reference holds none of the graph's outputs ({listed(outputs)})", path=reference.path)
    graph, _ = checkpoint_graph(source_checkpoint(onnx_path, Path(checkpoint) if checkpoint else None))
    absent = [name for name in graph.input_names if name not in reference.inputs]
    if absent:
        raise CaffeError(f"the reference has no input {listed(absent)} (it has {listed(list(reference.inputs))})",
                         path=reference.path)
    feed = {name: np.ascontiguousarray(reference.inputs[name], dtype=np.float32) for name in graph.input_names}
    missing = [name for name in compared if name not in graph.output_names]
    if missing:
        raise CaffeError(f"the source checkpoint's graph does not output {listed(missing)}", path=onnx_path)
    timings["load"] = time.perf_counter() - clock

    clock = time.perf_counter()
    try:
        values_ort = dict(zip(compared, run_session(session, feed, compared)))
    except Exception as error:  # e.g. an input size a fixed-size graph does not take
        shapes = ", ".join(f"{name} {value.shape}" for name, value in feed.items())
        raise CaffeError(f"onnxruntime cannot run it on the reference's inputs ({shapes}): "
                         f"{str(error).strip().splitlines()[0]}", path=onnx_path) from None
    timings["onnxruntime forward"] = time.perf_counter() - clock
    clock = time.perf_counter()
    values32, values64 = pytorch_values(graph, copy.deepcopy(graph).double(), feed)
    index = {name: i for i, name in enumerate(graph.output_names)}
    timings["PyTorch float32 and float64 forward"] = time.perf_counter() - clock

    rows = []
    for name in [n for n in reference.order if n in set(compared)]:
        expected = torch.from_numpy(np.ascontiguousarray(reference.get(name)))
        actual = torch.from_numpy(values_ort[name])
        if tuple(actual.shape) != tuple(expected.shape):
            raise CaffeError(f"blob '{name}': reference {tuple(expected.shape)} != ONNX {tuple(actual.shape)}",
                             path=reference.path)
        noise = error_stats(values32[index[name]], values64[index[name]])
        e2e = error_stats(actual, expected, scale=noise.scale)
        budget = NoiseBudget(noise, BUDGET_FACTOR, END_TO_END_FLOOR).tolerance
        ratio = budget.ratio(e2e)
        rows.append(BlobRow(name=name, shape=tuple(expected.shape), status=FAIL if ratio > 1.0 else PASS,
                            end_to_end=e2e, noise=noise, budget=budget, end_to_end_ratio=ratio,
                            note="ONNX graph output"))
    return verification_result(
        rows,
        scheme=SCHEME,
        reference=reference,
        device=f"cpu (onnxruntime {ort.__version__}, {onnx_path.name})",
        dtype="float32",
        scope="full",
        not_in_reference=tuple(name for name in wanted if name not in reference),
        not_mapped=tuple(name for name in reference.order if name not in set(outputs)),
        timings=timings,
    )


def record_onnx_parity(onnx_path: str | Path, result: VerificationResult, reference_path: str | Path) -> None:
    """Store the verdict in the ONNX file's sidecar (when it has one) under `parity`."""
    record = read_sidecar(onnx_path)
    if record is None:
        return
    worst = result.worst
    entry: dict[str, Any] = {
        "verdict": result.verdict,
        "reference_producer": result.producer,
        "reference_file": str(Path(reference_path).resolve()),
        "reference_sha256": sha256_file(reference_path),
        "blobs_compared": len(result.rows),
        "worst_blob": None if worst is None else {"name": worst.name, "tolerance_used": worst.worst_ratio},
        "device": result.device,
    }
    record["parity"] = entry
    write_sidecar(onnx_path, record)


def run_onnx(args: argparse.Namespace) -> int:
    """`python -m verify --onnx FILE --reference REF.h5 [--checkpoint DIR] [--report-dir DIR]`; returns the exit code.

    The report goes to --report-dir (default: `<name>_parity/` beside the ONNX file); the verdict is recorded in
    the ONNX file's sidecar. Exit codes as for checkpoints: 0 pass, 1 fail, 2 bad input (CaffeError propagates).
    """
    started = time.perf_counter()
    if args.reference is None:
        raise CaffeError("--onnx needs --reference (a reference-activations file whose inputs the graph takes)")
    if args.image or args.prototxt or args.caffemodel:
        raise CaffeError("--onnx is verified against --reference alone; drop --image/--prototxt/--caffemodel")
    if args.device != "cpu":
        raise CaffeError("--onnx runs in onnxruntime on the CPU; drop --device")
    onnx_path = Path(args.onnx)
    report_dir = args.report_dir or onnx_path.with_name(f"{onnx_path.stem}_parity")
    blobs = None if not args.blobs else [n for item in args.blobs for n in item.split(",") if n]
    with read_activations(args.reference) as reference:
        result = verify_onnx(onnx_path, reference, checkpoint=args.checkpoint, blobs=blobs)
    files = write_report(result, report_dir)
    record_onnx_parity(onnx_path, result, args.reference)
    print(summary_line(result))
    for name, seconds in result.timings.items():
        print(f"  {name}: {seconds:.2f} s")
    recorded = f"; verdict recorded in {sidecar_path(onnx_path)}" if read_sidecar(onnx_path) else ""
    print(f"report: {files.markdown} ({files.json.name}, {files.plot.name}){recorded}; "
          f"{time.perf_counter() - started:.1f} s in all")
    return 0 if result.passed else 1
