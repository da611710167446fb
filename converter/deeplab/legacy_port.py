"""Key layout of the earlier PyTorch port (pytorch-deeplab-resnet's MS_Deeplab), both directions.

That port wraps one torchvision-style ResNet as `Scale` (shared by its three scales) and
names the ASPP head `layer5.conv2d_list.{0..3}`; its BatchNorm modules hold
weight/bias/running_mean/running_var, plus `num_batches_tracked` when saved by
PyTorch >= 0.4.1. Its files carry no other keys, so a mapping between its layout and ours
is a prefix rename; anything else is reported, never guessed.
"""

from __future__ import annotations

import re
from typing import Callable

import torch

from converter.caffe.params import DEFAULT_BN_EPS
from converter.deeplab.names import config_from_state_dict, state_dict_keys
from converter.errors import CaffeError, listed

_BACKBONE_KEY = re.compile(
    r"(conv1\.weight|bn1\.(weight|bias|running_mean|running_var)"
    r"|layer[1-4]\.\d+\.(conv[123]\.weight|bn[123]\.(weight|bias|running_mean|running_var)"
    r"|downsample\.0\.weight|downsample\.1\.(weight|bias|running_mean|running_var)))"
)
_HEAD_KEY = re.compile(r"(\d+)\.(weight|bias)")
_OURS_BACKBONE = "backbone."
_OURS_HEAD = "aspp.branches."
_LEGACY_BACKBONE = "Scale."
_LEGACY_HEAD = "Scale.layer5.conv2d_list."
# The earlier port used PyTorch BatchNorm2d's default eps, which is Caffe's default too.
LEGACY_BN_EPS = DEFAULT_BN_EPS
_COUNTER = "num_batches_tracked"  # a training counter of PyTorch BatchNorm; the frozen model has none


def _fail(message: str, keys: list[str]) -> CaffeError:
    return CaffeError(f"{message}: {listed(sorted(keys), 8)}")


def _check_complete(ours: dict[str, torch.Tensor], spell: Callable[[str], str]) -> None:
    """Fail naming (in the caller's spelling) the keys a complete model of this depth lacks or has extra."""
    config, _ = config_from_state_dict(ours)
    expected = state_dict_keys(config)
    missing = [spell(key) for key in expected - ours.keys()]
    if missing:
        raise _fail("missing keys", missing)
    extra = [spell(key) for key in ours.keys() - expected]
    if extra:
        raise _fail("keys a DeepLab-v2 ResNet of this depth does not have", extra)


def _spell_legacy(key: str) -> str:
    if key.startswith(_OURS_HEAD):
        return _LEGACY_HEAD + key[len(_OURS_HEAD):]
    return _LEGACY_BACKBONE + key[len(_OURS_BACKBONE):]


def from_legacy(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict from an earlier-port state dict; its `num_batches_tracked` counters are dropped."""
    ours: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state_dict.items():
        if key.startswith(_LEGACY_HEAD) and _HEAD_KEY.fullmatch(key[len(_LEGACY_HEAD):]):
            ours[_OURS_HEAD + key[len(_LEGACY_HEAD):]] = value
        elif key.startswith(_LEGACY_BACKBONE) and _BACKBONE_KEY.fullmatch(key[len(_LEGACY_BACKBONE):]):
            ours[_OURS_BACKBONE + key[len(_LEGACY_BACKBONE):]] = value
        elif not (key.startswith(_LEGACY_BACKBONE) and key.endswith("." + _COUNTER)):
            unknown.append(key)
    if unknown:
        raise _fail("keys not in the earlier port's layout (Scale.conv1/bn1/layer1-4, Scale.layer5.conv2d_list)", unknown)
    _check_complete(ours, _spell_legacy)
    return ours


def to_legacy(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An earlier-port state dict from ours, without `num_batches_tracked` (its BN loads without them)."""
    legacy: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state_dict.items():
        if key.startswith(_OURS_HEAD) and _HEAD_KEY.fullmatch(key[len(_OURS_HEAD):]):
            legacy[_LEGACY_HEAD + key[len(_OURS_HEAD):]] = value
        elif key.startswith(_OURS_BACKBONE) and _BACKBONE_KEY.fullmatch(key[len(_OURS_BACKBONE):]):
            legacy[_LEGACY_BACKBONE + key[len(_OURS_BACKBONE):]] = value
        else:
            unknown.append(key)
    if unknown:
        raise _fail("keys this model's layout does not have (backbone.*, aspp.branches.*)", unknown)
    _check_complete(dict(state_dict), str)
    return legacy
