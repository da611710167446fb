"""A checkpoint folder to ONNX, checked with onnxruntime against the PyTorch module before it is written.

Exporter: torch's dynamo exporter (`torch.onnx.export(..., dynamo=True)`, built on `torch.export`
and onnxscript). It records the Python integer arithmetic of Caffe's size rules (Interp's
shrink/zoom formulas, pooling's ceil) as symbolic shapes, so `--dynamic-size` graphs compute every
blob's size the way Caffe does. The TorchScript exporter (`dynamo=False`) was tried on torch 2.13
and rejected: its tracer turns tensor shapes into tensors, so Caffe's Eltwise MAX shape check
(`models.caffe_layers.EltwiseMax`) cannot even run, and it cannot express a dynamic size.

Caffe semantics in the graph, each pinned by tests in onnxruntime:
- Ceil-mode pooling. Caffe drops a last window that would start in the bottom/right padding;
  ONNX's pooling shape rule only does so from opset 22 on (older opsets declare a larger output
  than any runtime that follows Caffe computes). The default opset is therefore 22; an older
  `--opset` is refused for a pooling layer whose window can start in the padding
  (pad >= kernel - stride + 1), naming the layer. onnxruntime computes MAX and the padded AVE
  divisor as Caffe does in every ceil+pad case the tests sweep, so no Pad + pool decomposition is
  needed for it.
- Interp becomes Resize (linear, `align_corners`), the multi-scale fusion Max, dilated convolutions
  Conv with dilations.

Self-check: onnxruntime (CPU) runs the graph on the checkpoint's verification input (the reference
recorded in its manifest when that file is still there, else the deterministic synthetic image);
each output must agree with the PyTorch float32 module within the verifier's budget: 10 x that
output's own PyTorch float32-vs-float64 error, at least 4 float32 ulps of its scale (onnxruntime
has no float64 path, so the PyTorch float64 run is the exact value). With `--dynamic-size` the
check runs at 321x321, 513x513 and a non-square aligned size.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import io
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from converter.atomic import write_atomic
from converter.checkpoint import ARCH, read_checkpoint, sha256_file
from converter.errors import CaffeError, listed
from converter.deeplab.names import DEFAULT_HEAD_NAME, caffe_msc_blob_taps
from converter.export.record import sidecar, source_record, write_sidecar
from converter.layers import ARCH as CAFFE_NET_ARCH
from converter.layers import CaffeNet, layer_name
from converter.loading import build_model
from models.alignment import is_aligned
from models.caffe_ops import CaffePool2d
from models.deeplab import DeepLabV2MSC
from verify.activations import read_activations
from verify.budget import NoiseBudget, error_stats
from verify.compare import BUDGET_FACTOR, END_TO_END_FLOOR, INPUT_BLOB
from verify.inputs import caffe_preprocess, synthetic_image

log = logging.getLogger(__name__)

DEFAULT_OPSET = 22  # the first opset whose ceil-mode pooling drops a last window starting in the padding
MIN_OPSET = 18  # the dynamo exporter's lowest
OUTPUT_CHOICES = ("fused", "all")
DEFAULT_SIZE = (321, 321)
DYNAMIC_CHECK_SIZES = ((321, 321), (513, 513), (321, 417))  # square release sizes and a non-square aligned one
SIZE_RANGE = (33, 4097)  # dynamic height/width bounds recorded in the graph
ONNX_EXTRA_HINT = "install the optional extra: pip install 'caffe2torch[onnx]' (onnx, onnxruntime, onnxscript)"


@dataclass(frozen=True)
class OutputCheck:
    """One output at one input size: onnxruntime against PyTorch float32, judged by the noise budget."""

    size: tuple[int, int]
    blob: str
    max_abs: float
    mean_abs: float
    scale: float
    noise_max_abs: float
    noise_mean_abs: float
    tolerance_max_rel: float
    tolerance_mean_rel: float
    ratio: float

    @property
    def passed(self) -> bool:
        return self.ratio <= 1.0


@dataclass(frozen=True)
class OnnxExport:
    """A written ONNX file, its sidecar and the self-check that allowed it to be written."""

    path: Path
    sidecar: Path
    opset: int
    outputs: tuple[str, ...]
    dynamic_size: bool
    checks: tuple[OutputCheck, ...]
    seconds: float

    @property
    def worst(self) -> OutputCheck:
        return max(self.checks, key=lambda check: check.ratio)


def require_onnx() -> tuple[ModuleType, ModuleType]:
    """The onnx and onnxruntime modules (and onnxscript, which the exporter needs); CaffeError if missing."""
    modules = []
    for name in ("onnx", "onnxruntime", "onnxscript"):
        try:
            modules.append(importlib.import_module(name))
        except ImportError:
            raise CaffeError(f"{name} is not installed; {ONNX_EXTRA_HINT}") from None
    return modules[0], modules[1]


class DeepLabMSCGraph(nn.Module):
    """The multi-scale DeepLab-v2 net as an export graph: data -> the score maps named like Caffe's blobs.

    The backbone, ASPP branches and Interps are `DeepLabV2MSC`'s own modules; the ASPP sum and the fusion
    are written out with the same operations in the same order (see `tower`). Its input-size policy is
    left out (padding to an aligned size is a Python decision that a dynamic graph cannot make): the
    graph takes aligned sizes, and the fusion's Max fails on others, as Caffe's Eltwise does.
    """

    def __init__(self, model: DeepLabV2MSC, outputs: str, head_name: str = DEFAULT_HEAD_NAME) -> None:
        super().__init__()
        self.model = model
        self.fuse_only = outputs == "fused"
        self.input_names = (INPUT_BLOB,)
        # Caffe's names of the four maps, from the blob taps: the head (full and 0.5 tower), the Interp, the fusion.
        blob_of = {tap: blob for blob, tap in caffe_msc_blob_taps(model.config, head_name).items()}
        names = tuple(blob_of[tap] for tap in (("aspp", 0), ("fc1_voc12_res075_interp", 0), ("aspp", 2),
                                               ("fc_fusion", 0)))
        self.output_names = names[-1:] if self.fuse_only else names

    def tower(self, data: torch.Tensor) -> torch.Tensor:
        """One tower's score map: the backbone, then the ASPP branches added left to right (ASPPHead's order).

        The Eltwise modules' shape checks hash the sizes, which symbolic sizes cannot be, so the
        graph adds and maximises directly, in the same order and with the same operations.
        """
        features = self.model.backbone(data)
        branches = self.model.aspp.branches
        out = branches[0](features)
        for branch in branches[1:]:
            out = out + branch(features)
        return out

    def forward(self, data: torch.Tensor) -> tuple[torch.Tensor, ...]:
        model = self.model
        full = self.tower(data)
        res075 = self.tower(model.data_res075(data))
        res05 = self.tower(model.data_res05(data))
        scale075 = model.fc1_voc12_res075_interp(res075)
        fused = torch.maximum(torch.maximum(full, scale075), model.fc1_voc12_res05_interp(res05))
        return (fused,) if self.fuse_only else (full, scale075, res05, fused)


class CaffeNetGraph(nn.Module):
    """A registry-built net (`converter.layers.CaffeNet`) as an export graph: its inputs in order, its
    output blobs as a tuple in `output_names` order (the module itself returns a dict by name)."""

    def __init__(self, net: CaffeNet) -> None:
        super().__init__()
        self.net = net
        self.input_names = tuple(net.input_names)
        self.output_names = tuple(net.output_names)

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.net(*inputs)
        return tuple(out[name] for name in self.output_names)


def deeplab_graph(checkpoint: Path, manifest: Mapping[str, Any], state_dict: dict[str, torch.Tensor],
                  outputs: str) -> DeepLabMSCGraph:
    """The export graph of a DeepLab checkpoint (multi-scale, weights loaded strictly, eval mode)."""
    model = build_model(dict(manifest), state_dict, msc=True, source=checkpoint)
    head_name = (manifest.get("coverage") or {}).get("head_name") or DEFAULT_HEAD_NAME
    return DeepLabMSCGraph(model, outputs, head_name).eval()


def checkpoint_graph(checkpoint: str | Path, outputs: str = "all") -> tuple[nn.Module, dict[str, Any]]:
    """The export graph of a checkpoint folder (its `input_names`/`output_names` are Caffe blob names) and its
    manifest: DeepLab's multi-scale net (`outputs` picks the maps) or a registry-built net (all its outputs)."""
    state_dict, manifest = read_checkpoint(checkpoint)
    arch = (manifest.get("model") or {}).get("arch")
    if arch == ARCH:
        return deeplab_graph(Path(checkpoint), manifest, state_dict, outputs), manifest
    if arch == CAFFE_NET_ARCH:
        net = build_model(manifest, state_dict, source=checkpoint)
        return CaffeNetGraph(net).eval(), manifest
    raise CaffeError(f"export-onnx knows arch {ARCH!r} and {CAFFE_NET_ARCH!r}, the checkpoint is {arch!r}",
                     path=checkpoint)


def check_pooling_opset(model: nn.Module, opset: int) -> None:
    """Refuse an opset before 22 when a ceil-mode pooling window can start in the padding (ONNX's older rule differs)."""
    if opset >= DEFAULT_OPSET:
        return
    for name, module in model.named_modules():
        if isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)) and module.ceil_mode:
            geometry = (module.kernel_size, module.stride, module.padding)
        elif isinstance(module, CaffePool2d) and module.ceil:
            geometry = (module.kernel, module.stride, module.pad)
        else:
            continue
        kernel, stride, pad = (_pair(value) for value in geometry)
        if any(p >= k - s + 1 for k, s, p in zip(kernel, stride, pad)):
            raise CaffeError(
                f"ceil-mode pooling (kernel {kernel}, stride {stride}, pad {pad}) can start a last window in the "
                f"padding, which ONNX before opset {DEFAULT_OPSET} sizes differently from Caffe; use --opset "
                f"{DEFAULT_OPSET} or later", layer=_caffe_layer(name))


def _caffe_layer(module_name: str) -> str:
    """The Caffe layer a module path belongs to (a registry net's `[net.]layers.<key>`), else the path itself."""
    head, _, rest = module_name.partition("layers.")
    return layer_name(rest.split(".")[0]) if head in ("", "net.") and rest else module_name


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[-1]))


Feed = dict[str, np.ndarray]


def verification_inputs(graph: nn.Module, manifest: Mapping[str, Any],
                        sizes: Sequence[tuple[int, int]] | None) -> list[Feed]:
    """The feeds the self-check runs: the manifest's reference inputs where their shapes fit, else synthetic ones.

    DeepLab (`sizes` given): one image per size. A registry net: one feed at its declared input shapes;
    a 3-channel image input gets the synthetic picture preprocessed as Caffe's data layer does, other
    inputs a seeded standard normal.
    """
    recorded = _recorded_reference_inputs(manifest)
    if sizes is not None:
        feeds = []
        for height, width in sizes:
            value = _fitting(recorded, INPUT_BLOB, (1, 3, height, width))
            feeds.append({INPUT_BLOB: caffe_preprocess(synthetic_image(height, width)) if value is None else value})
        return feeds
    rng = np.random.default_rng(0)
    feed = {}
    for name, shape in graph.net.graph.inputs.items():
        value = _fitting(recorded, name, tuple(shape))
        if value is None and len(shape) == 4 and shape[1] == 3:
            value = np.repeat(caffe_preprocess(synthetic_image(shape[2], shape[3])), shape[0], axis=0)
        if value is None:
            value = rng.standard_normal(tuple(shape)).astype(np.float32)
        feed[name] = value
    return [feed]


def _fitting(recorded: Feed, name: str, shape: tuple[int, ...]) -> np.ndarray | None:
    value = recorded.get(name)
    return value if value is not None and tuple(value.shape) == shape else None


def _recorded_reference_inputs(manifest: Mapping[str, Any]) -> Feed:
    """The inputs of the reference the checkpoint was verified against, if that file is still there unchanged."""
    parity = manifest.get("parity") or {}
    path, digest = parity.get("reference_file"), parity.get("reference_sha256")
    if not path or not Path(path).is_file() or sha256_file(path) != digest:
        return {}
    with read_activations(path) as reference:
        return {name: np.ascontiguousarray(value, dtype=np.float32) for name, value in reference.inputs.items()}


def pytorch_values(graph: nn.Module, graph64: nn.Module, feed: Feed) -> tuple[tuple[torch.Tensor, ...], ...]:
    """The graph's outputs on `feed` in float32 and, from its float64 copy `graph64`, the exact values."""
    with torch.no_grad():
        tensors = [torch.from_numpy(np.ascontiguousarray(feed[name], dtype=np.float32)) for name in graph.input_names]
        return tuple(graph(*tensors)), tuple(graph64(*[t.double() for t in tensors]))


def run_session(session: Any, feed: Feed, output_names: Sequence[str]) -> list[np.ndarray]:
    """onnxruntime's values of `output_names` for the inputs in `feed`."""
    return session.run(list(output_names), {name: np.ascontiguousarray(value, dtype=np.float32)
                                            for name, value in feed.items()})


def check_outputs(graph: nn.Module, session: Any, feeds: Sequence[Feed]) -> list[OutputCheck]:
    """Run onnxruntime, PyTorch float32 and float64 on each feed; judge each output by the noise budget."""
    graph64 = copy.deepcopy(graph).double()
    checks = []
    for feed in feeds:
        first = feed[graph.input_names[0]]
        size = (int(first.shape[-2]), int(first.shape[-1])) if first.ndim >= 2 else (int(first.shape[-1]), 1)
        values32, values64 = pytorch_values(graph, graph64, feed)
        values_ort = run_session(session, feed, graph.output_names)
        for blob, value32, value64, value_ort in zip(graph.output_names, values32, values64, values_ort):
            if tuple(value_ort.shape) != tuple(value32.shape):
                raise CaffeError(f"onnxruntime output '{blob}' has shape {tuple(value_ort.shape)}, "
                                 f"PyTorch {tuple(value32.shape)}")
            noise = error_stats(value32, value64)
            error = error_stats(torch.from_numpy(np.asarray(value_ort)).to(value32.dtype), value32, scale=noise.scale)
            tolerance = NoiseBudget(noise, BUDGET_FACTOR, END_TO_END_FLOOR).tolerance
            checks.append(OutputCheck(
                size=size, blob=blob, max_abs=error.max_abs, mean_abs=error.mean_abs, scale=noise.scale,
                noise_max_abs=noise.max_abs, noise_mean_abs=noise.mean_abs,
                tolerance_max_rel=tolerance.max_rel, tolerance_mean_rel=tolerance.mean_rel,
                ratio=tolerance.ratio(error),
            ))
    return checks


def export_graph(graph: nn.Module, feed: Feed, *, opset: int, dynamic_size: bool) -> Any:
    """The ONNX ModelProto of `graph` from torch's dynamo exporter (its progress chatter kept off stdout).

    The graph is captured with `torch.export` first, so an operation ONNX cannot express is traced back to
    the module that runs it: the CaffeError names the Caffe layer and the operation.
    """
    example = tuple(torch.from_numpy(np.ascontiguousarray(feed[name])) for name in graph.input_names)
    dynamic_shapes = None
    if dynamic_size:
        height = torch.export.Dim("height", min=SIZE_RANGE[0], max=SIZE_RANGE[1])
        width = torch.export.Dim("width", min=SIZE_RANGE[0], max=SIZE_RANGE[1])
        dynamic_shapes = ({2: height, 3: width},)
    chatter = io.StringIO()
    exported = None
    try:
        with contextlib.redirect_stdout(chatter), torch.no_grad():
            exported = torch.export.export(graph, example, dynamic_shapes=dynamic_shapes, strict=False,
                                           prefer_deferred_runtime_asserts_over_guards=True)
            program = torch.onnx.export(exported, dynamo=True, opset_version=opset, verbose=False, optimize=True)
    except Exception as error:  # the exporter raises many types; say which layer's operation could not be expressed
        log.debug("exporter output:\n%s", chatter.getvalue())
        text = str(error)
        op = _OPERATOR.search(text)
        what = f"the operation {op.group(1)}" if op else (text.strip().splitlines() or [type(error).__name__])[0]
        raise CaffeError(f"ONNX opset {opset} (torch.onnx dynamo exporter) cannot express {what}",
                         layer=_failing_layer(exported, text)) from None
    log.debug("exporter output:\n%s", chatter.getvalue())
    model = program.model_proto
    _name_values(model, [value.name for value in model.graph.input], graph.input_names)
    _name_values(model, [value.name for value in model.graph.output], graph.output_names)
    return model


def _name_values(model: Any, current: Sequence[str], wanted: Sequence[str]) -> None:
    """Give graph values Caffe's blob names. The exporter names internal values after operations ('exp',
    'max', ...), so a Caffe name already taken by an internal value moves that value aside first."""
    graph = model.graph
    taken = {name for node in graph.node for name in (*node.input, *node.output)}
    taken |= {value.name for value in (*graph.input, *graph.output, *graph.initializer)}
    for old, new in zip(current, wanted):
        if old == new:
            continue
        if new in taken:
            spare = next(f"{new}__{n}" for n in range(1, len(taken) + 2) if f"{new}__{n}" not in taken)
            _rename_value(graph, new, spare)
            taken.add(spare)
        _rename_value(graph, old, new)
        taken.add(new)


def _rename_value(graph: Any, old: str, new: str) -> None:
    for node in graph.node:
        node.input[:] = [new if name == old else name for name in node.input]
        node.output[:] = [new if name == old else name for name in node.output]
    for value in (*graph.input, *graph.output, *graph.value_info, *graph.initializer):
        if value.name == old:
            value.name = new


_OPERATOR = re.compile(r"OpOverload\(op='([\w.]+)'")
_FAILED_NODE = re.compile(r"translating node %(\w+)")


def _failing_layer(exported: Any, message: str) -> str | None:
    """The Caffe layer (or module path) whose module ran the graph node the exporter could not translate."""
    node_name = _FAILED_NODE.search(message)
    if exported is None or node_name is None:
        return None
    for node in exported.graph.nodes:
        if node.name == node_name.group(1):
            stack = node.meta.get("nn_module_stack") or {}
            paths = [path for path, _ in stack.values() if path]
            return _caffe_layer(paths[-1]) if paths else None
    return None


def write_onnx(
    graph: nn.Module,
    out: str | Path,
    feeds: Sequence[Feed],
    *,
    opset: int = DEFAULT_OPSET,
    dynamic_size: bool = False,
    properties: Mapping[str, str] | None = None,
) -> tuple[Any, list[OutputCheck]]:
    """Export `graph` to `out` only if onnxruntime agrees with it on every feed; returns (onnxruntime module, checks).

    `graph` has `input_names`, `output_names` (Caffe blob names) and returns a tuple; the first feed is the
    example the exporter traces. The file is written under a temporary name beside `out` and checked there.
    """
    onnx, ort = require_onnx()
    out = Path(out)
    if opset < MIN_OPSET:
        raise CaffeError(f"--opset {opset}: the dynamo exporter writes opset {MIN_OPSET} or later")
    if out.is_dir():
        raise CaffeError("is a directory: give the .onnx file to write", path=out)
    if not out.parent.is_dir() or not os.access(out.parent, os.W_OK):
        raise CaffeError("cannot write here: the folder is missing or not writable", path=out)
    check_pooling_opset(graph, opset)
    model_proto = export_graph(graph, feeds[0], opset=opset, dynamic_size=dynamic_size)
    onnx.helper.set_model_props(model_proto, dict(properties or {}))
    checks: list[OutputCheck] = []

    def write(temporary: Path) -> None:
        onnx.save(model_proto, str(temporary))
        session = ort.InferenceSession(str(temporary), providers=["CPUExecutionProvider"])
        checks.extend(check_outputs(graph, session, feeds))
        failed = [c for c in checks if not c.passed]
        if failed:
            worst = max(failed, key=lambda c: c.ratio)
            raise CaffeError(
                f"onnxruntime disagrees with PyTorch beyond the noise budget on {listed([c.blob for c in failed])}: "
                f"worst '{worst.blob}' at {worst.size[0]}x{worst.size[1]}, max abs {worst.max_abs:.3g} "
                f"({worst.ratio:.2f}x its tolerance); nothing written", path=out)

    write_atomic(out, write)
    return ort, checks


def export_onnx(
    checkpoint: str | Path,
    out: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    dynamic_size: bool = False,
    outputs: str = "fused",
    size: tuple[int, int] | None = None,
) -> OnnxExport:
    """Export a checkpoint folder to ONNX at `out`, checked with onnxruntime first; sidecar `<out>.json` beside it."""
    started = time.perf_counter()
    onnx, _ = require_onnx()
    out = Path(out)
    if outputs not in OUTPUT_CHOICES:
        raise CaffeError(f"--outputs {outputs!r}: expected one of {', '.join(OUTPUT_CHOICES)}")
    graph, manifest = checkpoint_graph(checkpoint, outputs)
    deeplab = isinstance(graph, DeepLabMSCGraph)
    if not deeplab and (dynamic_size or size is not None or outputs != "fused"):
        raise CaffeError("--dynamic-size, --size and --outputs are for DeepLab's multi-scale net; a registry-built "
                         "net exports at its declared input shapes with all its outputs", path=checkpoint)
    sizes = None
    if deeplab:
        recorded = _recorded_reference_inputs(manifest).get(INPUT_BLOB)
        if size is None:
            size = tuple(recorded.shape[-2:]) if recorded is not None else DEFAULT_SIZE
        sizes = DYNAMIC_CHECK_SIZES if dynamic_size else (tuple(size),)
        for height, width in sizes:
            if not (is_aligned(height) and is_aligned(width)):
                raise CaffeError(f"input size {height}x{width} does not align the multi-scale fusion "
                                 "(aligned sizes are 32k+1 .. 32k+6 per axis, e.g. 321 or 513)")
    feeds = verification_inputs(graph, manifest, sizes)
    shapes = ", ".join(f"{name} {'x'.join(map(str, value.shape))}" for name, value in feeds[0].items())
    size_note = (f"dynamic: height and width in {SIZE_RANGE[0]}..{SIZE_RANGE[1]} of the form 32k+1 .. 32k+6 "
                 "(other sizes cannot fuse the three towers; Max fails, as Caffe's Eltwise does)"
                 if dynamic_size else f"fixed: {shapes}")
    source = source_record(checkpoint, manifest)
    properties = {
        "caffe2torch.source_checkpoint": source["checkpoint"],
        "caffe2torch.source_sha256": json.dumps(source["sha256"]),
        "caffe2torch.inputs": ", ".join(graph.input_names) + (" (BGR minus the mean, as Caffe's data layer feeds it)"
                                                              if deeplab else ""),
        "caffe2torch.input_sizes": size_note,
        "caffe2torch.outputs": ", ".join(graph.output_names),
    }
    try:
        ort, checks = write_onnx(graph, out, feeds, opset=opset, dynamic_size=dynamic_size, properties=properties)
    except CaffeError as error:
        raise CaffeError(error.message, path=error.path or checkpoint, layer=error.layer) from None
    recorded_used = bool(_recorded_reference_inputs(manifest))
    details = {
        "exporter": f"torch.onnx dynamo (torch {torch.__version__})",
        "opset": opset,
        "inputs": list(graph.input_names),
        "outputs": list(graph.output_names),
        "input_sizes": size_note,
        "check": {
            "runtime": f"onnxruntime {ort.__version__} CPUExecutionProvider",
            "against": "PyTorch float32, budget 10 x each output's float32-vs-float64 error (floor 4 ulps)",
            "input": "the manifest's reference inputs where their shapes fit, else synthetic"
            if recorded_used else "synthetic (verify.inputs)",
            "verdict": "pass",
            "outputs": [c.__dict__ | {"size": list(c.size)} for c in checks],
        },
        "onnx_versions": {"onnx": onnx.__version__, "onnxruntime": ort.__version__},
    }
    try:
        side = write_sidecar(out, sidecar("onnx", source, out, details))
    except BaseException:
        out.unlink(missing_ok=True)
        raise
    seconds = time.perf_counter() - started
    log.info("exported %s (opset %d) in %.1f s; onnxruntime check passed", out, opset, seconds)
    return OnnxExport(out, side, opset, tuple(graph.output_names), dynamic_size, tuple(checks), seconds)
