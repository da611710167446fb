"""Test-phase filtering and the layers that become the module's inputs or are left out.

- Input and data layers (Data, ImageData, ImageSegData, HDF5Data, ...) become inputs: their
  tops are blobs the caller feeds. Shapes come from the net where it states them (Input,
  legacy `input_shape`/`input_dim`, DummyData, MemoryData, a data layer's crop_size) or
  from the caller (`--input-shape NAME=N,C,H,W`).
- Silence layers are left out; what they consume is not an output (and an input only they
  read need not be fed).
- Losses, accuracy and writer layers (SegAccuracy, MatWrite, HDF5Output) are left out at
  test time and listed; so are layers whose include/exclude rules leave them out of the phase.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from converter.caffe.netdesc import Layer
from converter.caffe.schema import caffe_pb
from converter.errors import CaffeError

INPUT_TYPES = frozenset(
    {"Input", "Data", "ImageData", "ImageSegData", "HDF5Data", "MemoryData", "WindowData", "DummyData", "AnnotatedData"}
)
DROPPED_TYPES = frozenset({"Accuracy", "SegAccuracy", "MatWrite", "HDF5Output"})
# Silence computes nothing: the builder leaves it out, but the blobs it consumes are not net outputs.
SILENCE = "Silence"
PHASES = ("TRAIN", "TEST")


def is_dropped_type(type_name: str) -> bool:
    """Loss, accuracy and writer layers: not part of an inference module."""
    return type_name.endswith("Loss") or type_name in DROPPED_TYPES


def _rule_met(rule: Any, phase: str, level: int, stages: frozenset[str]) -> bool:
    """Caffe's StateMeetsRule for one NetStateRule."""
    if rule.HasField("phase") and caffe_pb().Phase.Name(rule.phase) != phase:
        return False
    if rule.HasField("min_level") and level < rule.min_level:
        return False
    if rule.HasField("max_level") and level > rule.max_level:
        return False
    if any(stage not in stages for stage in rule.stage):
        return False
    return not any(stage in stages for stage in rule.not_stage)


def in_phase(layer: Layer, phase: str = "TEST", level: int = 0, stages: tuple[str, ...] = ()) -> bool:
    """Whether Caffe's net filter keeps `layer` in `phase`: any include rule met, or no exclude rule met."""
    if phase not in PHASES:
        raise CaffeError(f"phase must be one of {PHASES}, got {phase!r}")
    param, wanted = layer.param, frozenset(stages)
    if len(param.include):
        return any(_rule_met(rule, phase, level, wanted) for rule in param.include)
    return not any(_rule_met(rule, phase, level, wanted) for rule in param.exclude)


def stated_shapes(layer: Layer, net_inputs: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Shapes of a data layer's tops that the net itself states (tops it does not state are absent)."""
    p = layer.param
    tops = layer.tops
    if layer.type == "Input":
        return {top: tuple(net_inputs[top]) for top in tops if net_inputs.get(top)}
    if layer.type == "DummyData":
        shapes = p.dummy_data_param.shape
        if len(shapes) == 1:
            return {top: tuple(shapes[0].dim) for top in tops}
        return {top: tuple(shape.dim) for top, shape in zip(tops, shapes)}
    if layer.type == "MemoryData":
        m = p.memory_data_param
        return {tops[0]: (m.batch_size, m.channels, m.height, m.width)} if m.batch_size else {}
    crop = p.transform_param.crop_size
    if not crop:
        return {}
    batch = {
        "Data": p.data_param.batch_size,
        "ImageData": p.image_data_param.batch_size,
        "ImageSegData": p.image_data_param.batch_size,
        "WindowData": p.window_data_param.batch_size,
    }.get(layer.type, 0) or 1
    channels = 3 if layer.type != "ImageData" or p.image_data_param.is_color else 1
    shapes = {tops[0]: (batch, channels, crop, crop)}
    if len(tops) > 1 and layer.type == "ImageSegData":
        shapes[tops[1]] = (batch, 1, crop, crop)
    return shapes
