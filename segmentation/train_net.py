"""What the trainer reads from a Caffe train prototxt: the data layer's transform, per-parameter lr_mult /
decay_mult (shared by name across the towers), and the loss layers' ignore label.

`${NAME}` placeholders are filled from `--define NAME=VALUE` before parsing (the release's templates
write `num_output: ${NUM_LABELS}` and `fc1_${EXP}_c0`), with the project's prototxt reader. Without a train net the trainer
uses `default_train_net`, the VOC12 release's values.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from converter.caffe.prototxt import read_prototxt
from converter.deeplab.names import LAYER_TYPE_OF_KIND, detect_head_name, name_map, tower_copy_names
from converter.deeplab.surgery import HEAD_PREFIX
from converter.errors import CaffeError, listed
from converter.layers.data import in_phase
from models.deeplab import ResNetConfig
from segmentation.losses import LOSS_NAMES
from segmentation.solver import defines_in, float32_decimal, read_text
from segmentation.transforms import TransformParams
from segmentation.voc import IGNORE_LABEL

# The release's multipliers (train.prototxt): backbone 1/1, head weights 10/1, head biases 20/0.
HEAD_WEIGHT_MULTS = (10.0, 1.0)
HEAD_BIAS_MULTS = (20.0, 0.0)
BACKBONE_MULTS = (1.0, 1.0)
DATA_LAYER_TYPES = ("ImageSegData",)
FROZEN_TYPES = ("BatchNorm", "Scale")  # the model keeps them fixed: their lr_mult must be 0


@dataclass(frozen=True)
class TrainNet:
    """The train net's data transform, per-parameter (lr_mult, decay_mult) by state-dict key, ignore label."""

    transform: TransformParams = TransformParams()
    mults: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    ignore_label: int = IGNORE_LABEL
    batch_size: int = 1  # image_data_param.batch_size (Caffe's images per forward)
    source: str | None = None  # the prototxt read, if any

    def to_json(self) -> dict[str, Any]:
        transform = self.transform
        return {
            "source": self.source,
            "crop": [transform.crop_height, transform.crop_width],
            "mirror": transform.mirror,
            "mean_bgr": list(transform.mean_bgr),
            "scale_factors": list(transform.scale_factors),
            "value_scale": transform.value_scale,
            "ignore_label": self.ignore_label,
            "caffe_batch_size": self.batch_size,
            "mults": {key: list(value) for key, value in self.mults.items()},
        }


def default_mults(model: torch.nn.Module) -> dict[str, tuple[float, float]]:
    """The release's multipliers for every trainable parameter of a DeepLab-v2 model."""
    mults = {}
    for name, _ in model.named_parameters():
        if not name.startswith(HEAD_PREFIX):
            mults[name] = BACKBONE_MULTS
        else:
            mults[name] = HEAD_BIAS_MULTS if name.endswith(".bias") else HEAD_WEIGHT_MULTS
    return mults


def default_train_net(model: torch.nn.Module, transform: TransformParams | None = None) -> TrainNet:
    """The VOC12 release's data layer, multipliers and ignore label."""
    return TrainNet(transform=transform or TransformParams(), mults=default_mults(model))


def _transform(layer: Any, ignore_label: int, path: str) -> TransformParams:
    param = layer.transform_param
    if param.HasField("mean_file"):
        raise CaffeError("mean_file is not supported by ImageSegData; use mean_value", path=path, layer=layer.name)
    means = list(param.mean_value)
    if len(means) == 1:
        means *= 3
    if len(means) != 3:
        raise CaffeError(f"expected 3 mean_value entries (B, G, R), got {len(means)}", path=path, layer=layer.name)
    if param.HasField("crop_size"):
        crop = (param.crop_size, param.crop_size)
    elif param.HasField("crop_height") and param.HasField("crop_width"):
        crop = (param.crop_height, param.crop_width)
    else:
        raise CaffeError("the data layer needs crop_size (or crop_height and crop_width)", path=path, layer=layer.name)
    try:
        return TransformParams(
            crop_height=crop[0],
            crop_width=crop[1],
            mirror=bool(param.mirror),
            mean_bgr=tuple(float32_decimal(m) for m in means),  # type: ignore[arg-type]
            scale_factors=tuple(float32_decimal(s) for s in param.scale_factors),
            value_scale=float32_decimal(param.scale),
            ignore_label=ignore_label,
        )
    except CaffeError as error:
        raise CaffeError(error.message, path=path, layer=layer.name) from None


def _ignore_label(layers: list[Any], path: str) -> int:
    """The one ignore label of the SoftmaxWithLoss layers; VALID normalisation and weight 1 required."""
    losses = [layer for layer in layers if layer.type == "SoftmaxWithLoss"]
    if not losses:
        raise CaffeError("no SoftmaxWithLoss layer in the TRAIN phase", path=path)
    labels = set()
    for layer in losses:
        loss_param = layer.loss_param
        if loss_param.HasField("normalize") or loss_param.normalization != loss_param.VALID:
            raise CaffeError("only VALID normalisation is supported (the release's default)", path=path, layer=layer.name)
        if any(weight != 1 for weight in layer.loss_weight):
            raise CaffeError(f"loss_weight {list(layer.loss_weight)}: only 1 is supported", path=path, layer=layer.name)
        if not loss_param.HasField("ignore_label"):
            raise CaffeError("SoftmaxWithLoss without ignore_label: the trainer needs one", path=path, layer=layer.name)
        labels.add(loss_param.ignore_label)
    names = sorted(layer.name for layer in losses)
    if names != sorted(LOSS_NAMES):
        raise CaffeError(f"expected the loss layers {', '.join(LOSS_NAMES)}, found {', '.join(names)}", path=path)
    if len(labels) != 1:
        raise CaffeError(f"the loss layers use different ignore labels {sorted(labels)}", path=path)
    return labels.pop()


def _param_mults(net: Any, config: ResNetConfig, model: torch.nn.Module, path: str) -> dict[str, tuple[float, float]]:
    """(lr_mult, decay_mult) per trainable state-dict key from the layers' param specs.

    Specs are shared by name: every layer (the three towers' copies) naming a param must give it the
    same multipliers. BatchNorm and Scale blobs must have lr_mult 0: the model keeps them frozen.
    """
    head_name = detect_head_name((layer.name for layer in net.layers), default=None, path=path)
    by_name: dict[str, tuple[float, float, str]] = {}
    for layer in net.layers:
        for spec in layer.param.param:
            if not spec.name:
                continue
            value = (float(spec.lr_mult), float(spec.decay_mult))
            seen = by_name.setdefault(spec.name, (*value, layer.name))
            if seen[:2] != value:
                raise CaffeError(
                    f"param '{spec.name}' has lr_mult/decay_mult {value} here but {seen[:2]} in layer '{seen[2]}'",
                    path=path,
                    layer=layer.name,
                )
    trainable = dict(model.named_parameters())
    rows = name_map(config, head_name)
    covered = {copy for row in rows for copy in (row.layer, *tower_copy_names(row.layer, head_name))}
    extra = [layer.name for layer in net.layers if layer.type in FROZEN_TYPES + ("Convolution",) and layer.name not in covered]
    if extra:
        raise CaffeError(f"layers {listed(extra)} are not in the model: the train net does not match the model ({config})", path=path)
    mults = {}
    for row in rows:
        if not net.has_layer(row.layer):
            raise CaffeError(f"no layer '{row.layer}': the train net does not match the model ({config})", path=path)
        layer = net.layer(row.layer)
        if layer.type != LAYER_TYPE_OF_KIND[row.kind]:
            raise CaffeError(f"expected a {LAYER_TYPE_OF_KIND[row.kind]} layer, got {layer.type}", path=path, layer=layer.name)
        specs = layer.param.param
        spec = specs[row.index] if row.index < len(specs) else None
        value = (1.0, 1.0) if spec is None else (float(spec.lr_mult), float(spec.decay_mult))
        if layer.type in FROZEN_TYPES:
            if value[0] != 0:
                raise CaffeError(
                    f"param {row.index} has lr_mult {value[0]:g}: BatchNorm and Scale are frozen in this trainer (lr_mult 0)",
                    path=path,
                    layer=layer.name,
                )
        elif row.key in trainable:
            mults[row.key] = value
    missing = [key for key in trainable if key not in mults]
    if missing:
        raise CaffeError(f"no param spec for {listed(missing)}: the train net does not match the model", path=path)
    return mults


def read_train_net(
    path: str | os.PathLike[str],
    model: torch.nn.Module,
    config: ResNetConfig,
    defines: Mapping[str, str] | None = None,
) -> TrainNet:
    """The TrainNet a Caffe train prototxt describes for `model` (a DeepLab-v2 of `config`).

    `defines` fill the `${NAME}` placeholders the file uses (one --define list serves solver and net).
    """
    net = read_prototxt(path, defines_in(read_text(path), defines or {}))
    layers = [layer.param for layer in net.layers if in_phase(layer, "TRAIN")]
    data = [layer for layer in layers if layer.type in DATA_LAYER_TYPES]
    if len(data) != 1:
        raise CaffeError(f"expected one ImageSegData layer in the TRAIN phase, found {len(data)}", path=path)
    ignore_label = _ignore_label(layers, str(path))
    # ImageSegData pads the label with image_data_param.ignore_label (load_batch passes it to the
    # transformer); a value the losses do not ignore would train padding as a class.
    padding_label = data[0].image_data_param.ignore_label
    if padding_label != ignore_label:
        raise CaffeError(
            f"image_data_param.ignore_label {padding_label} (the label padding) differs from the losses' {ignore_label}",
            path=path,
            layer=data[0].name,
        )
    return TrainNet(
        transform=_transform(data[0], ignore_label, str(path)),
        mults=_param_mults(net, config, model, str(path)),
        ignore_label=ignore_label,
        batch_size=int(data[0].image_data_param.batch_size) or 1,
        source=str(Path(path).resolve()),
    )
