"""Verify a converted DeepLab-v2 state dict against a reference-activations file, blob by blob.

Two checks, both must pass (docs/parity.md gives the measurements behind the constants):

1. End to end. The model runs once in float32 on the reference's input and every mapped
   blob is compared with the reference. fp32 rounding compounds through 100+ layers: on
   the full-size net two honest fp32 implementations agree to ~1e-6 of scale at conv1 but
   only to ~1e-4 at res5c, so no single tolerance fits every depth. The budget of each
   blob is therefore derived from the model itself: the model runs again in float64 (same
   weights, same input: the exact value of this net) and the blob's own float32 noise,
   max and mean |x32 - x64|, times BUDGET_FACTOR is what the reference may differ by.
   The reference, another fp32 implementation, is about as far from exact as PyTorch
   fp32 is: measured, an honest pair differs by 0.5-1.3x the noise at every depth, so
   the factor 10 leaves ~8x room for other CPUs, GPUs and less careful summation, while
   a mistake the size of a BatchNorm eps on a near-eps channel is 1000s of times larger.
   END_TO_END_FLOOR (4 float32 ulps of the scale) covers blobs computed exactly.
2. Teacher forcing. Each mapped step (stem, pool1, every branch or block of the full
   tower, the ASPP branches and sum, Interp and fusion steps, stem/first block/head of the
   other towers) runs alone in float32 on the reference's own input blobs and is compared
   with the reference's output. A single step's fp32 noise is tiny and does not compound,
   so the tolerance is tight: TEACHER_FLOOR (1e-5 of scale max abs, 1e-6 mean abs). A step
   whose error exceeds it is run again in float64 on the same inputs, and it fails only if
   its error also exceeds BUDGET_FACTOR x its own fp32 noise: the same rule as end to end,
   which keeps long reductions (GPU convolutions over 18k terms) honest without computing
   float64 for every step. The first failing step names the layer where the conversion
   goes wrong even when the end-to-end errors downstream are all large.

Scale of a blob = its largest exact magnitude; errors are reported relative to it.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from converter.loading import load_weights_strictly
from converter.errors import CaffeError, listed
from converter.deeplab.names import caffe_blocks
from models.deeplab import DeepLabV2, DeepLabV2MSC, ResNetConfig
from verify.activations import ActivationsFile
from verify.budget import ErrorStats, NoiseBudget, Tolerance, error_stats, ulps
from verify.capture import BlobMap, blob_map, capture_blobs
from verify.result import FAIL, PASS, SKIPPED, BlobRow, Scheme, VerificationResult, verification_result
from verify.stages import stages_not_covered
from verify.teacher import ForcedStep, forced_steps

log = logging.getLogger(__name__)

BUDGET_FACTOR = 10.0
END_TO_END_FLOOR = ulps(4)
TEACHER_FLOOR = Tolerance(max_rel=1e-5, mean_rel=1e-6)
INPUT_BLOB = "data"
SCHEME = Scheme(
    budget_factor=BUDGET_FACTOR,
    floor=END_TO_END_FLOOR,
    teacher=TEACHER_FLOOR,
    description=(
        "End to end, each blob may differ from the reference by "
        f"{BUDGET_FACTOR:g} x its own PyTorch float32-vs-float64 error (max abs and mean abs, each), "
        "at least 4 float32 ulps of its scale. Teacher-forced, each step fed the reference's inputs "
        f"may differ by {TEACHER_FLOOR.max_rel:.0e} (max abs) and {TEACHER_FLOOR.mean_rel:.0e} (mean abs) "
        f"of its scale, or, where more, by {BUDGET_FACTOR:g} x that step's own float32-vs-float64 error "
        "(measured only for steps above the floor). Both checks must hold."
    ),
)


@dataclass(frozen=True)
class ModelSpec:
    """What the checkpoint's state dict was made for."""

    config: ResNetConfig
    num_classes: int
    bn_eps: float


def load_model(state_dict: Mapping[str, torch.Tensor], spec: ModelSpec, *, multi_scale: bool, source: str) -> nn.Module:
    """The DeepLab-v2 model (multi-scale at Caffe's own sizes, or single) with the state dict loaded strictly."""
    model: nn.Module
    if multi_scale:
        model = DeepLabV2MSC(spec.num_classes, spec.config, spec.bn_eps, align="strict")
    else:
        model = DeepLabV2(spec.num_classes, spec.config, spec.bn_eps)
    load_weights_strictly(model, state_dict, source=source)
    return model.eval()


def verify_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    spec: ModelSpec,
    reference: ActivationsFile,
    *,
    source: str,
    device: str = "cpu",
    blobs: Sequence[str] | None = None,
    scope: str = "full",
    drift: bool | None = None,
    allow_partial: bool = False,
) -> VerificationResult:
    """Verify a DeepLab-v2 state dict against the reference file: the model and blob map the reference
    calls for (multi-scale or single, its head name) are built here, then `verify_model` runs both checks.

    `blobs` restricts the comparison to those reference blobs; `scope` "backbone" skips the head's
    blobs (a checkpoint whose head was replaced by surgery); `drift` (default: on for CUDA) adds the
    information-only TF32 and bf16-autocast errors of a few stage blobs; `allow_partial` accepts a
    reference that leaves whole stages out (verify/stages.py), which the result then lists.
    """
    clock = time.perf_counter()
    torch_device(device)  # a bad device fails before the model is built
    mapping = blob_map(spec.config, reference.order, reference.prototxt)
    model = load_model(state_dict, spec, multi_scale=mapping.multi_scale, source=source)
    loaded = time.perf_counter() - clock
    result = verify_model(model, mapping, spec.config, reference, device=device, blobs=blobs, scope=scope, drift=drift,
                          allow_partial=allow_partial)
    timings = dict(result.timings)
    timings["load"] += loaded  # building the model is part of loading
    return dataclasses.replace(result, timings=timings)


def verify_model(
    model: nn.Module,
    mapping: BlobMap,
    config: ResNetConfig,
    reference: ActivationsFile,
    *,
    device: str = "cpu",
    blobs: Sequence[str] | None = None,
    scope: str = "full",
    drift: bool | None = None,
    allow_partial: bool = False,
) -> VerificationResult:
    """Verify `model` (a DeepLab-v2 of `config`, weights loaded) against the reference file, blob by
    blob, through its blob taps `mapping` (both checks; see the module docstring). The model is moved
    to `device`; options as in `verify_state_dict`.
    """
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    target = torch_device(device)
    names = _requested(reference, blobs)
    mapped = [n for n in names if n in mapping]
    not_mapped = tuple(n for n in names if n not in mapping)
    wanted = set(names) if blobs is not None else None
    not_in_reference = tuple(
        n for n in [*mapping.taps, *mapping.tails] if n not in reference and (wanted is None or n in wanted)
    )
    skipped = {n for n in mapped if scope == "backbone" and mapping.is_head(n)}
    compared = [n for n in mapped if n not in skipped]
    if not compared:
        raise CaffeError(
            "the reference holds none of the blobs the PyTorch model maps"
            + (f" (it holds {listed(list(names))})" if names else ""),
            path=reference.path,
        )
    stages_left_out = stages_not_covered(mapping, compared, scope=scope) if blobs is None else ()
    if stages_left_out and not allow_partial:
        raise CaffeError(
            f"the reference leaves out whole stages of the model ({', '.join(stages_left_out)}): no blob of theirs "
            "is in it; give a complete reference, or --allow-partial to verify the rest",
            path=reference.path,
        )
    data = _input(reference)
    model = model.eval().to(target)
    timings["load"] = time.perf_counter() - clock

    with exact_float32(target):
        clock = time.perf_counter()
        value32 = _capture(model, data.to(target), mapping, compared, reference)
        timings["float32 forward"] = time.perf_counter() - clock
        _check_shapes(value32, reference)

        clock = time.perf_counter()
        model64 = copy.deepcopy(model).to(torch.float64)
        noise = _float64_noise(model64, data.to(target), mapping, compared, value32)
        timings["float64 forward"] = time.perf_counter() - clock

        clock = time.perf_counter()
        available = set(reference.order) | set(reference.inputs)
        steps = {s.output: s for s in forced_steps(model, config, mapping, available)}
        steps64 = {s.output: s for s in forced_steps(model64, config, mapping, available)}
        blobs_read = ReferenceBlobs(reference, target)
        end_to_end, teacher = {}, {}
        for name in compared:  # forward order: a step's inputs were mostly read just before
            ref = blobs_read.get(name)
            end_to_end[name] = error_stats(value32.pop(name), ref, scale=noise[name].scale)
            if name in steps:
                teacher[name] = teacher_forced(steps[name], steps64[name], blobs_read)
        timings["compare and teacher forcing"] = time.perf_counter() - clock

    rows = []
    for name in names:
        shape = reference.shape(name)
        if name in skipped:
            rows.append(BlobRow(name, shape, SKIPPED, note="head replaced by surgery"))
        elif name in end_to_end:
            rows.append(blob_row(name, shape, end_to_end[name], noise[name], teacher.get(name)))
    drift_info: dict[str, dict[str, float]] = {}
    if target.type == "cuda" if drift is None else drift:
        clock = time.perf_counter()
        drift_info = _drift(model, data.to(target), mapping, config, compared, reference)
        timings["drift (information)"] = time.perf_counter() - clock
    result = verification_result(
        rows,
        scheme=SCHEME,
        reference=reference,
        **device_and_dtype(target),
        scope=scope,
        not_in_reference=not_in_reference,
        stages_not_compared=stages_left_out,
        not_mapped=not_mapped,
        drift=drift_info,
        timings=timings,
    )
    log.info("verification %s: %d blobs, %d teacher-forced", result.verdict, len(end_to_end), len(teacher))
    return result


def blob_row(name: str, shape: tuple[int, ...], e2e: ErrorStats, noise: ErrorStats, forced: ForcedCheck | None) -> BlobRow:
    """One blob's report row: its end-to-end error against 10x its own fp32-vs-fp64 noise, plus teacher forcing."""
    budget = NoiseBudget(noise, BUDGET_FACTOR, END_TO_END_FLOOR).tolerance
    e2e_ratio = budget.ratio(e2e)
    failed = e2e_ratio > 1.0 or (forced is not None and forced.ratio > 1.0)
    return BlobRow(
        name=name,
        shape=shape,
        status=FAIL if failed else PASS,
        end_to_end=e2e,
        noise=noise,
        budget=budget,
        end_to_end_ratio=e2e_ratio,
        teacher=None if forced is None else forced.stats,
        teacher_inputs=() if forced is None else forced.step.inputs,
        teacher_noise=None if forced is None else forced.noise,
        teacher_budget=None if forced is None else forced.budget,
        teacher_ratio=None if forced is None else forced.ratio,
        note="" if forced is None else forced.step.what,
    )


def _requested(reference: ActivationsFile, blobs: Sequence[str] | None) -> list[str]:
    if blobs is None:
        return list(reference.order)
    absent = [n for n in blobs if n not in reference]
    if absent:
        raise CaffeError(f"blobs asked for are not in the reference: {listed(absent)}", path=reference.path)
    wanted = set(blobs)
    return [n for n in reference.order if n in wanted]


def _input(reference: ActivationsFile) -> torch.Tensor:
    if INPUT_BLOB not in reference.inputs:
        raise CaffeError(
            f"the reference has no input '{INPUT_BLOB}' (inputs: {', '.join(reference.inputs) or 'none'})",
            path=reference.path,
        )
    data = reference.inputs[INPUT_BLOB]
    if data.ndim != 4 or data.shape[1] != 3:
        raise CaffeError(f"input '{INPUT_BLOB}' has shape {data.shape}, expected N,3,H,W", path=reference.path)
    return torch.from_numpy(np.ascontiguousarray(data))


def _capture(
    model: nn.Module, data: torch.Tensor, mapping: BlobMap, names: Sequence[str], reference: ActivationsFile
) -> dict[str, torch.Tensor]:
    try:
        return capture_blobs(model, data, mapping, names)
    except ValueError as error:  # the multi-scale fusion cannot align this input size (as in Caffe)
        raise CaffeError(f"input '{INPUT_BLOB}' {tuple(data.shape)}: {error}", path=reference.path) from None


def _check_shapes(values: Mapping[str, torch.Tensor], reference: ActivationsFile) -> None:
    wrong = [
        f"'{name}' reference {reference.shape(name)} != PyTorch {tuple(value.shape)}"
        for name, value in values.items()
        if reference.shape(name) != tuple(value.shape)
    ]
    if wrong:
        raise CaffeError(f"blob shapes differ: {listed(wrong)}", path=reference.path)


def _float64_noise(
    model64: nn.Module, data: torch.Tensor, mapping: BlobMap, names: Sequence[str], value32: Mapping[str, torch.Tensor]
) -> dict[str, ErrorStats]:
    """Each blob's float32 rounding noise: |x32 - x64| with the model and input in float64, reduced in the hook."""
    noise: dict[str, ErrorStats] = {}

    def reduce(name: str, exact: torch.Tensor) -> None:
        noise[name] = error_stats(value32[name], exact)

    capture_blobs(model64, data.to(torch.float64), mapping, names, on_blob=reduce)
    return noise


@dataclass(frozen=True)
class ForcedCheck:
    """One teacher-forced step's outcome; `noise` only when its error exceeded the floor."""

    step: ForcedStep
    stats: ErrorStats
    noise: ErrorStats | None
    budget: Tolerance
    ratio: float


def teacher_forced(step: ForcedStep, step64: ForcedStep, blobs: ReferenceBlobs) -> ForcedCheck:
    """Run the step in float32 on the reference's inputs; above the floor, measure its own float32 noise."""
    with torch.no_grad():
        inputs = [blobs.get(name) for name in step.inputs]
        try:
            output = step.run(*inputs)
            stats = error_stats(output, blobs.get(step.output))
        except (RuntimeError, ValueError) as error:  # reference blobs of shapes the step cannot take
            shapes = ", ".join(f"{name} {tuple(x.shape)}" for name, x in zip(step.inputs, inputs))
            raise CaffeError(f"teacher-forced step {step.what} -> '{step.output}' fails on the reference's "
                             f"{shapes}: {str(error).splitlines()[0]}", path=blobs.reference.path) from None
        noise = None
        if TEACHER_FLOOR.ratio(stats) > 1.0:
            noise = error_stats(output, step64.run(*[x.to(torch.float64) for x in inputs]))
    budget = NoiseBudget(noise, BUDGET_FACTOR, TEACHER_FLOOR).tolerance
    return ForcedCheck(step, stats, noise, budget, budget.ratio(stats))


class ReferenceBlobs:
    """Reference blobs and inputs as tensors on the device, the last few kept so each is read from disk ~once."""

    def __init__(self, reference: ActivationsFile, device: torch.device, keep: int = 8) -> None:
        self.reference, self.device, self.keep = reference, device, keep
        self.recent: OrderedDict[str, torch.Tensor] = OrderedDict()

    def get(self, name: str) -> torch.Tensor:
        if name in self.recent:
            self.recent.move_to_end(name)
            return self.recent[name]
        reference = self.reference
        value = reference.get(name) if name in reference else reference.inputs[name]
        tensor = torch.from_numpy(np.ascontiguousarray(value)).to(self.device)
        self.recent[name] = tensor
        if len(self.recent) > self.keep:
            self.recent.popitem(last=False)
        return tensor


def _drift(
    model: nn.Module,
    data: torch.Tensor,
    mapping: BlobMap,
    config: ResNetConfig,
    compared: Sequence[str],
    reference: ActivationsFile,
) -> dict[str, dict[str, float]]:
    """Max abs error / scale vs the reference of a few stage blobs with TF32 on and with bf16 autocast."""
    stage_ends = {block[0]: block for _, block in caffe_blocks(config)}  # the last block of each stage
    stages = {"conv1", "pool1", mapping.head_name, "fc_fusion", "fc1_interp"}
    stages.update(f"res{block}" for block in stage_ends.values())
    names = [n for n in compared if n in stages]
    modes = {
        "tf32": lambda: _tf32(True),
        "bf16 autocast": lambda: torch.autocast(device_type=data.device.type, dtype=torch.bfloat16),
    }
    out: dict[str, dict[str, float]] = {}
    for mode, context in modes.items():
        with exact_float32(data.device), context():
            values = capture_blobs(model, data, mapping, names)
        blobs = ReferenceBlobs(reference, data.device)
        out[mode] = {n: error_stats(values[n], blobs.get(n)).max_rel for n in names}
    return out


@contextlib.contextmanager
def _tf32(enabled: bool) -> Iterator[None]:
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    precision = torch.get_float32_matmul_precision()
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    torch.set_float32_matmul_precision("high" if enabled else "highest")
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
        torch.set_float32_matmul_precision(precision)


def exact_float32(device: torch.device) -> contextlib.AbstractContextManager[None]:
    """TF32 off for the verdict on CUDA (float32 must mean float32); nothing to change on the CPU."""
    return _tf32(False) if device.type == "cuda" else contextlib.nullcontext()


def torch_device(name: str) -> torch.device:
    """The device `--device` names; CaffeError when it is not a name or not present here."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CaffeError(f"--device {name!r}: not a device name (cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CaffeError("--device cuda: no CUDA device is available to this PyTorch build")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise CaffeError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def device_and_dtype(target: torch.device) -> dict[str, str]:
    """The `device` and verdict `dtype` fields of a result computed by PyTorch on `target` (TF32 is off on CUDA)."""
    return {"device": _device_name(target), "dtype": "float32 (TF32 off)" if target.type == "cuda" else "float32"}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)}, torch {torch.__version__})"
    return f"cpu (torch {torch.__version__}, {torch.get_num_threads()} threads)"
