"""All DeepLab-v2 naming knowledge: Caffe's block, tower and head names, the name map, the blob taps.

The Caffe-name -> PyTorch-key map is data: one row per Caffe blob the model uses. Caffe splits
each normalisation into a BatchNorm layer (mean, variance, moving-average factor) and a Scale
layer (gamma, beta); the model folds both into one frozen module, so five Caffe blobs feed four
state-dict entries (the factor divides the statistics). `converter.deeplab.convert` checks the
map one-to-one against a net and against the model. The blob taps name, for every Caffe blob,
the module of `models.deeplab` whose output is the blob's value (what the verifier hooks).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping

from converter.errors import CaffeError
from models.deeplab import ASPP_DILATIONS, ResNetConfig

__all__ = [
    "CAFFE_STAGES",
    "DEFAULT_HEAD_NAME",
    "HEAD_BRANCHES",
    "LAYER_TYPE_OF_KIND",
    "MSC_TOWER_SUFFIXES",
    "TOWER_SUFFIXES",
    "BlobKind",
    "BlobRow",
    "caffe_blob_taps",
    "caffe_block_name",
    "caffe_blocks",
    "caffe_msc_blob_taps",
    "config_from_state_dict",
    "detect_head_name",
    "head_layer_names",
    "name_map",
    "state_dict_keys",
    "tower_copy_names",
    "tower_name",
]

CAFFE_STAGES = (2, 3, 4, 5)  # Caffe res2..res5 = layer1..layer4
DEFAULT_HEAD_NAME = "fc1_voc12"

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

# The multi-scale nets repeat every layer in two more towers, the 0.75 and 0.5 scales, under these suffixes.
TOWER_SUFFIXES: tuple[str, ...] = ("_res075", "_res05")
# All towers' suffixes in the order DeepLabV2MSC runs them (full, 0.75, 0.5): a shared module's call index.
MSC_TOWER_SUFFIXES: tuple[str, ...] = ("",) + TOWER_SUFFIXES
HEAD_BRANCHES = len(ASPP_DILATIONS)
_HEAD_BRANCH_0 = re.compile(r"(fc1_.+)_c0")


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


def tower_name(name: str, suffix: str, head_name: str) -> str:
    """Caffe's name of layer or blob `name` in the tower with `suffix` ("" is the full tower).

    The suffix goes at the end (res2a_branch1_res075), except on head branches, where it goes
    before the branch number (fc1_voc12_res075_c0), as in the DeepLab-v2 prototxts.
    """
    prefix = f"{head_name}_c"
    if suffix and name.startswith(prefix) and name[len(prefix):].isdigit():
        return f"{head_name}{suffix}_c{name[len(prefix):]}"
    return name + suffix


def tower_copy_names(layer: str, head_name: str) -> tuple[str, ...]:
    """Names of `layer`'s copies in the 0.75 and 0.5 towers."""
    return tuple(tower_name(layer, suffix, head_name) for suffix in TOWER_SUFFIXES)


def detect_head_name(
    names: Iterable[str], *, default: str | None = DEFAULT_HEAD_NAME, path: str | Path | None = None
) -> str:
    """The ASPP head's prefix (fc1_voc12, fc1_coco, ...) among layer or blob names: the one
    fc1_<name> with a branch fc1_<name>_c0 that is not a tower copy (fc1_<name><tower suffix>_c0).

    When there is none: `default` (a reference that holds no head blob), or with `default=None` (a
    net that must have a head) CaffeError naming `path`; several heads: CaffeError.
    """
    heads = sorted({
        match.group(1)
        for name in names
        if (match := _HEAD_BRANCH_0.fullmatch(name)) and not match.group(1).endswith(TOWER_SUFFIXES)
    })
    if len(heads) == 1:
        return heads[0]
    if len(heads) > 1:
        raise CaffeError(f"several ASPP heads ({', '.join(heads)}); name the one to convert", path=path)
    if default is not None:
        return default
    raise CaffeError("no ASPP head: expected layers fc1_<name>_c0 .. fc1_<name>_c3", path=path)


def caffe_block_name(stage: int, index: int) -> str:
    """Caffe's block letter(s): res2/res5 use a, b, c, ...; res3/res4 use a, b1, b2, ... (by stage)."""
    if stage not in CAFFE_STAGES:
        raise ValueError(f"stage must be one of {CAFFE_STAGES}, got {stage}")
    if stage in (2, 5):
        return chr(ord("a") + index)
    return "a" if index == 0 else f"b{index}"


def caffe_blocks(config: ResNetConfig) -> list[tuple[str, str]]:
    """(module path, Caffe block id such as "2a" or "4b22") of every block, in forward order."""
    return [
        (f"backbone.layer{layer}.{index}", f"{stage}{caffe_block_name(stage, index)}")
        for layer, (stage, count) in enumerate(zip(CAFFE_STAGES, config.blocks), start=1)
        for index in range(count)
    ]


def caffe_blob_taps(config: ResNetConfig, head_name: str = DEFAULT_HEAD_NAME) -> dict[str, str]:
    """Caffe blob name -> path (relative to DeepLabV2, also valid on DeepLabV2MSC) of the module
    whose forward output equals the blob's value when Caffe's forward ends, in forward order."""
    taps = {"conv1": "backbone.relu", "pool1": "backbone.maxpool"}
    for path, block in caffe_blocks(config):
        if block[1:] == "a":
            taps[f"res{block}_branch1"] = f"{path}.downsample.1"
        taps[f"res{block}_branch2a"] = f"{path}.relu1"
        taps[f"res{block}_branch2b"] = f"{path}.relu2"
        taps[f"res{block}_branch2c"] = f"{path}.bn3"
        taps[f"res{block}"] = f"{path}.relu_out"
    for branch, layer in enumerate(head_layer_names(head_name)):
        taps[layer] = f"aspp.branches.{branch}"
    taps[head_name] = "aspp"
    return taps


def caffe_msc_blob_taps(config: ResNetConfig, head_name: str = DEFAULT_HEAD_NAME) -> dict[str, tuple[str, int]]:
    """Caffe blob name of the multi-scale net -> (module path in DeepLabV2MSC, call index).

    The towers share modules, so a hook on a tower module fires once per tower: call 0 is the
    full tower, 1 the 0.75 tower, 2 the 0.5 tower (`MSC_TOWER_SUFFIXES`); blob names follow `tower_name`.
    """
    taps: dict[str, tuple[str, int]] = {"data_res075": ("data_res075", 0), "data_res05": ("data_res05", 0)}
    for call, suffix in enumerate(MSC_TOWER_SUFFIXES):
        for blob, path in caffe_blob_taps(config, head_name).items():
            taps[tower_name(blob, suffix, head_name)] = (path, call)
    taps[f"{head_name}_res075_interp"] = ("fc1_voc12_res075_interp", 0)
    taps[f"{head_name}_res05_interp"] = ("fc1_voc12_res05_interp", 0)
    taps["fc_fusion"] = ("fc_fusion", 0)
    return taps


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
