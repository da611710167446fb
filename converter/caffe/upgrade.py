"""Upgrade legacy V1 layer definitions (NetParameter.layers, enum types) to current LayerParameters.

Follows Caffe's own UpgradeV1LayerParameter (src/caffe/util/upgrade_proto.cpp) so every
consumer sees only current layers: the type enum becomes the current type name, the
per-blob `param` names, `blob_share_mode`, `blobs_lr` and `weight_decay` become ParamSpecs,
and every typed `*_param` is copied as is (V1 and V2 share those messages). Blobs are not
touched: the reader decodes them separately. V0 definitions (a `layer` nested inside a V1
layer, from before 2014) are rejected.
"""

from __future__ import annotations

from typing import Any

from converter.errors import CaffeError
from converter.caffe.schema import caffe_pb

__all__ = ["V1_TYPE_NAMES", "upgrade_v1_layer"]

# V1LayerParameter.LayerType name -> current type string (Caffe's UpgradeV1LayerType).
V1_TYPE_NAMES = {
    "ABSVAL": "AbsVal",
    "ACCURACY": "Accuracy",
    "ARGMAX": "ArgMax",
    "BNLL": "BNLL",
    "CONCAT": "Concat",
    "CONTRASTIVE_LOSS": "ContrastiveLoss",
    "CONVOLUTION": "Convolution",
    "DATA": "Data",
    "DECONVOLUTION": "Deconvolution",
    "DROPOUT": "Dropout",
    "DUMMY_DATA": "DummyData",
    "EUCLIDEAN_LOSS": "EuclideanLoss",
    "ELTWISE": "Eltwise",
    "EXP": "Exp",
    "FLATTEN": "Flatten",
    "HDF5_DATA": "HDF5Data",
    "HDF5_OUTPUT": "HDF5Output",
    "HINGE_LOSS": "HingeLoss",
    "IM2COL": "Im2col",
    "IMAGE_DATA": "ImageData",
    "INFOGAIN_LOSS": "InfogainLoss",
    "INNER_PRODUCT": "InnerProduct",
    "LRN": "LRN",
    "MEMORY_DATA": "MemoryData",
    "MULTINOMIAL_LOGISTIC_LOSS": "MultinomialLogisticLoss",
    "MVN": "MVN",
    "POOLING": "Pooling",
    "POWER": "Power",
    "RELU": "ReLU",
    "SIGMOID": "Sigmoid",
    "SIGMOID_CROSS_ENTROPY_LOSS": "SigmoidCrossEntropyLoss",
    "SILENCE": "Silence",
    "SOFTMAX": "Softmax",
    "SOFTMAX_LOSS": "SoftmaxWithLoss",
    "SPLIT": "Split",
    "SLICE": "Slice",
    "TANH": "TanH",
    "WINDOW_DATA": "WindowData",
    "THRESHOLD": "Threshold",
}

# Repeated fields copied unchanged from V1LayerParameter to LayerParameter.
_COPIED = ("bottom", "top", "include", "exclude", "loss_weight")


def upgrade_v1_layer(v1: Any, path: Any = None) -> Any:
    """The LayerParameter equivalent of V1LayerParameter `v1` (its blobs are not copied).

    CaffeError (naming `path` and the layer) for a V0 definition or a missing/unknown type.
    """
    pb = caffe_pb()
    name = v1.name or None
    if v1.HasField("layer"):
        raise CaffeError("V0 layer definition (pre-2014 Caffe) is not supported", path=path, layer=name)
    if not v1.HasField("type") or v1.type == pb.V1LayerParameter.NONE:
        raise CaffeError("V1 layer has no known type", path=path, layer=name)
    layer = pb.LayerParameter()
    if v1.HasField("name"):
        layer.name = v1.name
    for field in _COPIED:
        getattr(layer, field).extend(getattr(v1, field))
    layer.type = V1_TYPE_NAMES[pb.V1LayerParameter.LayerType.Name(v1.type)]
    for descriptor, value in v1.ListFields():
        if descriptor.name.endswith("_param") and descriptor.message_type is not None:
            getattr(layer, descriptor.name).CopyFrom(value)
    _upgrade_param_specs(v1, layer)
    return layer


def _upgrade_param_specs(v1: Any, layer: Any) -> None:
    """V1's parallel per-blob lists (names, share modes, lr and decay multipliers) -> one ParamSpec per blob."""
    specs = max(len(v1.param), len(v1.blob_share_mode), len(v1.blobs_lr), len(v1.weight_decay))
    for _ in range(specs):
        layer.param.add()
    for spec, name in zip(layer.param, v1.param):
        spec.name = name
    for spec, mode in zip(layer.param, v1.blob_share_mode):
        spec.share_mode = mode
    for spec, lr in zip(layer.param, v1.blobs_lr):
        spec.lr_mult = lr
    for spec, decay in zip(layer.param, v1.weight_decay):
        spec.decay_mult = decay
