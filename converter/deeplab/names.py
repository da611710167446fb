"""The DeepLab-v2 Caffe-name -> PyTorch-key map, as data: one row per Caffe blob the model uses.

Caffe splits each normalisation into a BatchNorm layer (mean, variance, moving-average
factor) and a Scale layer (gamma, beta); the model folds both into one frozen module, so
five Caffe blobs feed four state-dict entries (the factor divides the statistics).
`deeplab_convert` checks the map one-to-one against a net and against the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Mapping

from converter.errors import CaffeError
from models.deeplab import (
    ASPP_DILATIONS,
    CAFFE_STAGES,
    DEFAULT_HEAD_NAME,
    MSC_TOWER_SUFFIXES,
    ResNetConfig,
    caffe_block_name,
    caffe_blocks,
)

__all__ = [
    "DEFAULT_HEAD_NAME",
    "HEAD_BRANCHES",
    "LAYER_TYPE_OF_KIND",
    "TOWER_SUFFIXES",
    "BlobKind",
    "BlobRow",
    "caffe_block_name",
    "config_from_state_dict",
    "head_layer_names",
    "name_map",
    "state_dict_keys",
    "tower_copy_names",
]

BlobKind = Literal[
    "conv_weight", "bn_mean", "bn_var", "bn_factor", "scale_weight", "scale_bias", "head_weight", "head_bias"
]

# The Caffe layer type each kind of blob must come from.
LAYER_TYPE_OF_KIND: dict[str, str] = {
    "conv_weight": "Convolution",
    "head_weight": "Convolution",
    "head_bias": "Convolution",
    "bn_mean": "BatchNorm",
    "bn_var": "BatchNorm",
    "bn_factor": "BatchNorm",
    "scale_weight": "Scale",
    "scale_bias": "Scale",
}

# The multi-scale nets repeat every parameter layer in two more towers under these suffixes.
TOWER_SUFFIXES: tuple[str, ...] = tuple(suffix for suffix in MSC_TOWER_SUFFIXES if suffix)
HEAD_BRANCHES = len(ASPP_DILATIONS)


@dataclass(frozen=True)
class BlobRow:
    """Blob `index` of Caffe layer `layer` fills state-dict `key` (None: the BN factor, a divisor only)."""

    layer: str
    index: int
    key: str | None
    kind: BlobKind


def head_layer_names(head_name: str) -> tuple[str, ...]:
    """The four ASPP branch layers of a head, e.g. fc1_voc12_c0 .. fc1_voc12_c3."""
    return tuple(f"{head_name}_c{k}" for k in range(HEAD_BRANCHES))


def tower_copy_names(layer: str, head_name: str) -> tuple[str, ...]:
    """Names of `layer`'s copies in the 0.75 and 0.5 towers.

    Backbone layers take the suffix at the end (res2a_branch1_res075); head branches take it
    before the branch number (fc1_voc12_res075_c0), as in the DeepLab-v2 prototxts.
    """
    prefix = f"{head_name}_c"
    if layer.startswith(prefix) and layer[len(prefix):].isdigit():
        return tuple(f"{head_name}{suffix}_c{layer[len(prefix):]}" for suffix in TOWER_SUFFIXES)
    return tuple(layer + suffix for suffix in TOWER_SUFFIXES)


def _norm_rows(bn_layer: str, scale_layer: str, module: str) -> list[BlobRow]:
    return [
        BlobRow(bn_layer, 0, f"{module}.running_mean", "bn_mean"),
        BlobRow(bn_layer, 1, f"{module}.running_var", "bn_var"),
        BlobRow(bn_layer, 2, None, "bn_factor"),
        BlobRow(scale_layer, 0, f"{module}.weight", "scale_weight"),
        BlobRow(scale_layer, 1, f"{module}.bias", "scale_bias"),
    ]


def _conv_norm_rows(caffe_suffix: str, conv_key: str, norm_module: str) -> list[BlobRow]:
    """res<suffix> conv, bn<suffix> BatchNorm and scale<suffix> Scale of one backbone convolution."""
    rows = [BlobRow(f"res{caffe_suffix}", 0, conv_key, "conv_weight")]
    return rows + _norm_rows(f"bn{caffe_suffix}", f"scale{caffe_suffix}", norm_module)


def name_map(config: ResNetConfig, head_name: str = DEFAULT_HEAD_NAME) -> tuple[BlobRow, ...]:
    """Every Caffe blob of the single-tower DeepLab-v2 net for `config`, in net order."""
    rows = [BlobRow("conv1", 0, "backbone.conv1.weight", "conv_weight")]
    rows += _norm_rows("bn_conv1", "scale_conv1", "backbone.bn1")
    for prefix, caffe_block in caffe_blocks(config):
        if prefix.endswith(".0"):  # a stage's first block has the projection shortcut
            rows += _conv_norm_rows(f"{caffe_block}_branch1", f"{prefix}.downsample.0.weight", f"{prefix}.downsample.1")
        for conv, letter in enumerate("abc", start=1):
            rows += _conv_norm_rows(f"{caffe_block}_branch2{letter}", f"{prefix}.conv{conv}.weight", f"{prefix}.bn{conv}")
    for branch, layer in enumerate(head_layer_names(head_name)):
        rows.append(BlobRow(layer, 0, f"aspp.branches.{branch}.weight", "head_weight"))
        rows.append(BlobRow(layer, 1, f"aspp.branches.{branch}.bias", "head_bias"))
    return tuple(rows)


def state_dict_keys(config: ResNetConfig) -> frozenset[str]:
    """The state-dict keys the map fills for `config` (those of DeepLabV2 and DeepLabV2MSC)."""
    return frozenset(row.key for row in name_map(config) if row.key is not None)


def config_from_state_dict(state_dict: Mapping[str, Any]) -> tuple[ResNetConfig, int]:
    """The ResNetConfig and class count a state dict in this layout was made for (from keys and shapes)."""

    def shape(key: str) -> tuple[int, ...]:
        if key not in state_dict:
            raise CaffeError(f"state dict has no key '{key}'")
        return tuple(state_dict[key].shape)

    blocks = []
    for layer_index in range(1, len(CAFFE_STAGES) + 1):
        count = 0
        while f"backbone.layer{layer_index}.{count}.conv1.weight" in state_dict:
            count += 1
        blocks.append(count)
    widths = tuple(shape(f"backbone.layer{i}.0.conv1.weight")[0] for i in range(1, len(CAFFE_STAGES) + 1))
    config = ResNetConfig(blocks=tuple(blocks), stem_width=shape("backbone.conv1.weight")[0], widths=widths)
    return config, shape("aspp.branches.0.weight")[0]
