"""Verify any registry-built net (converter.layers.CaffeNet) against a reference-activations file.

The same two checks, noise budget and report as the DeepLab path (verify/compare.py), with the
blob taps coming from the net itself: the CaffeNet returns every blob by its Caffe name.

1. End to end: the net runs in float32 on the reference's inputs; each blob it makes that the
   reference holds is compared within BUDGET_FACTOR x its own float32-vs-float64 noise.
2. Teacher forcing: each blob's step is the layer that first produces it plus the layers that
   then rewrite it in place (Convolution + BatchNorm + Scale + ReLU on one blob is one step),
   run alone on the reference's own bottoms. A step is formed only where the reference holds
   the values that step read: a bottom that a later layer rewrites in place holds its final
   value in the reference, not the one the step saw, so such steps are left out.
"""

from __future__ import annotations

import argparse
import copy
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from converter.build_cli import name_value_pairs
from converter.caffe.load import load_net
from converter.errors import CaffeError, listed
from converter.layers import INPUT_TYPES, CaffeNet, LayerInfo, build_net, load_plugin
from verify.activations import ActivationsFile, read_activations
from verify.budget import error_stats
from verify.compare import SCHEME, ReferenceBlobs, blob_row, device_and_dtype, exact_float32, teacher_forced, torch_device
from verify.result import VerificationResult, verification_result
from verify.teacher import ForcedStep

SCOPE = "full"
DEFAULT_REPORT_ROOT = Path("build") / "parity"


@dataclass(frozen=True)
class _Writer:
    position: int
    info: LayerInfo


def forced_steps(net: CaffeNet, available: set[str]) -> list[ForcedStep]:
    """One teacher-forced step per blob whose step inputs the reference holds with the values the step read."""
    writers: dict[str, list[_Writer]] = {}
    for position, info in enumerate(net.graph.layers):
        for top in info.tops:
            writers.setdefault(top, []).append(_Writer(position, info))
    last_write = {blob: ws[-1].position for blob, ws in writers.items()}
    steps = []
    for blob, chain in writers.items():
        inputs: list[str] = []
        stable = True
        for index, writer in enumerate(chain):
            for bottom in writer.info.bottoms:
                if index and bottom == blob:
                    continue  # the in-place input: the previous layer of the chain makes it
                if last_write.get(bottom, -1) > writer.position:
                    stable = False  # rewritten after this read: the reference holds a later value
                if bottom not in inputs:
                    inputs.append(bottom)
        if stable and inputs and all(name in available for name in inputs):
            steps.append(ForcedStep(blob, tuple(inputs), _chain_runner(net, blob, chain, inputs), _describe(chain)))
    return steps


def _chain_runner(net: CaffeNet, blob: str, chain: list[_Writer], inputs: list[str]) -> Callable[..., torch.Tensor]:
    """The chain's layers run one after another, the blob passed along, other bottoms from `inputs`."""

    def run(*values: torch.Tensor) -> torch.Tensor:
        given = dict(zip(inputs, values))
        value = torch.empty(0)
        for index, writer in enumerate(chain):
            bottoms = [value if (index and b == blob) else given[b] for b in writer.info.bottoms]
            tops = net.run_key(writer.info.key, *bottoms)
            value = tops[writer.info.tops.index(blob)]
        return value

    return run


def _describe(chain: list[_Writer]) -> str:
    return " + ".join(f"{w.info.type} {w.info.name}" for w in chain)


def verify_caffe_net(
    net: CaffeNet, reference: ActivationsFile, *, device: str = "cpu", blobs: Sequence[str] | None = None
) -> VerificationResult:
    """Verify `net` (weights loaded) against `reference`, blob by blob, both checks (module docstring)."""
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    target = torch_device(device)
    names = list(reference.order) if blobs is None else [n for n in reference.order if n in set(blobs)]
    if blobs is not None and len(names) != len(set(blobs)):
        absent = [n for n in blobs if n not in reference]
        raise CaffeError(f"blobs asked for are not in the reference: {listed(absent)}", path=reference.path)
    made = set(net.graph.blob_shapes)
    compared = [n for n in names if n in made and n not in net.graph.inputs]
    not_mapped = tuple(n for n in names if n not in made)
    if not compared:
        raise CaffeError(f"the reference holds none of the blobs the net makes (it holds {listed(names)})",
                         path=reference.path)
    feeds = _feeds(net, reference)
    net = net.eval().to(target)
    timings["load"] = time.perf_counter() - clock

    with exact_float32(target), torch.no_grad():
        clock = time.perf_counter()
        value32 = net.run({k: v.to(target) for k, v in feeds.items()}, keep=compared)
        timings["float32 forward"] = time.perf_counter() - clock
        wrong = [f"'{n}' reference {reference.shape(n)} != PyTorch {tuple(value32[n].shape)}"
                 for n in compared if reference.shape(n) != tuple(value32[n].shape)]
        if wrong:
            raise CaffeError(f"blob shapes differ: {listed(wrong)}", path=reference.path)

        clock = time.perf_counter()
        net64 = copy.deepcopy(net).to(torch.float64)
        value64 = net64.run({k: v.to(target, torch.float64) for k, v in feeds.items()}, keep=compared)
        noise = {n: error_stats(value32[n], value64.pop(n)) for n in compared}
        timings["float64 forward"] = time.perf_counter() - clock

        clock = time.perf_counter()
        available = set(reference.order) | set(reference.inputs)
        steps = {s.output: s for s in forced_steps(net, available)}
        steps64 = {s.output: s for s in forced_steps(net64, available)}
        read = ReferenceBlobs(reference, target)
        rows = []
        for name in compared:
            e2e = error_stats(value32.pop(name), read.get(name), scale=noise[name].scale)
            forced = teacher_forced(steps[name], steps64[name], read) if name in steps else None
            rows.append(blob_row(name, reference.shape(name), e2e, noise[name], forced))
        timings["compare and teacher forcing"] = time.perf_counter() - clock
    return verification_result(
        rows,
        scheme=SCHEME,
        reference=reference,
        **device_and_dtype(target),
        scope=SCOPE,
        not_in_reference=tuple(n for n in net.graph.blob_shapes if n not in reference and n not in net.graph.inputs),
        not_mapped=not_mapped,
        timings=timings,
    )


def _feeds(net: CaffeNet, reference: ActivationsFile) -> dict[str, torch.Tensor]:
    """Every net input from the reference's /inputs, in the net's shapes."""
    missing = [name for name in net.input_names if name not in reference.inputs]
    if missing:
        raise CaffeError(f"the reference has no input {listed(missing)} (inputs: {listed(list(reference.inputs))})",
                         path=reference.path)
    return {name: torch.from_numpy(np.ascontiguousarray(reference.inputs[name])) for name in net.input_names}


def report_folder(net_name: str, prototxt: Path) -> Path:
    """The default report folder of a net verified without a checkpoint: build/parity/<net name>/."""
    name = net_name if re.fullmatch(r"[A-Za-z0-9_.+-]+", net_name or "") else prototxt.stem
    return DEFAULT_REPORT_ROOT / name


def run_without_checkpoint(args: argparse.Namespace) -> tuple[VerificationResult, Path]:
    """PROTOTXT + CAFFEMODEL + REFERENCE: build the net in memory through the registry and verify it.

    Returns the result and the default report folder (build/parity/<net name>/); nothing is
    recorded, as there is no checkpoint.
    """
    defines = name_value_pairs(args.define, "--define")
    for module in args.plugin or []:
        load_plugin(module)
    net = load_net(args.caffemodel, args.prototxt, defines=defines)
    with read_activations(args.reference) as reference:
        declared = set(net.inputs) | {top for layer in net.layers if layer.type in INPUT_TYPES for top in layer.tops}
        shapes = {name: tuple(value.shape) for name, value in reference.inputs.items() if name in declared}
        built = build_net(net, input_shapes=shapes)
        result = verify_caffe_net(built, reference, device=args.device, blobs=args.blob_list)
    return result, report_folder(net.name, Path(args.prototxt))
