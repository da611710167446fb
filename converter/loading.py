"""Building a model from a checkpoint: the manifest says which architecture, the weights load strictly.

Kept apart from `converter.checkpoint` (the folder format only), so reading a checkpoint folder
does not need the model code and new architectures are added here in one place.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from converter.caffe.prototxt import prototxt_net
from converter.checkpoint import ARCH, read_checkpoint
from converter.errors import CaffeError, listed
from converter.layers import ARCH as CAFFE_NET_ARCH
from converter.layers import build_net, load_plugin
from models.deeplab import DeepLabV2, DeepLabV2MSC, ResNetConfig


def load_weights_strictly(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], *, source: str | Path) -> None:
    """Load `state_dict` into `model` exactly; a CaffeError naming `source` lists every missing,
    unexpected and wrongly shaped key (in model order, so the first one is telling)."""
    expected = model.state_dict()
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    wrong = [
        f"{key} {tuple(state_dict[key].shape)} != model {tuple(value.shape)}"
        for key, value in expected.items()
        if key in state_dict and tuple(state_dict[key].shape) != tuple(value.shape)
    ]
    problems = [
        f"{what} {listed(keys)}"
        for what, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", wrong))
        if keys
    ]
    if problems:
        raise CaffeError("checkpoint does not fit the model: " + "; ".join(problems), path=source)
    model.load_state_dict(dict(state_dict), strict=True)


def _build_deeplab(manifest: dict[str, Any], *, msc: bool, path: str | Path) -> torch.nn.Module:
    """DeepLab-v2 (multi-scale or single-scale) from the manifest's model entry, weights not loaded yet."""
    entry = manifest["model"]
    config = ResNetConfig(**entry["config"])
    model_class = DeepLabV2MSC if msc else DeepLabV2
    return model_class(num_classes=entry["num_classes"], config=config, bn_eps=entry["bn_eps"])


def _build_caffe_net(manifest: dict[str, Any], *, msc: bool, path: str | Path) -> torch.nn.Module:
    """A registry-built net (`python -m converter build`) rebuilt from the net text its manifest keeps,
    with the phase, input shapes and plugins recorded at build time (`msc` does not apply)."""
    entry, text = manifest["model"], manifest.get("prototxt_text")
    if not isinstance(text, str) or not text:
        raise CaffeError("manifest of a caffe_net checkpoint has no prototxt_text to rebuild the net from", path=path)
    for module in entry.get("plugins") or []:
        load_plugin(module)
    net = prototxt_net(text, path)
    return build_net(net, phase=entry.get("phase", "TEST"), input_shapes=entry.get("input_shapes") or {})


# The manifest's model arch -> the function that builds its (untrained) module.
BUILDERS: dict[str, Callable[..., torch.nn.Module]] = {ARCH: _build_deeplab, CAFFE_NET_ARCH: _build_caffe_net}


def build_model(
    manifest: dict[str, Any], state_dict: dict[str, torch.Tensor], *, msc: bool = True, source: str | Path = "checkpoint"
) -> torch.nn.Module:
    """The model a manifest describes (dispatched on its arch), weights loaded strictly, in eval mode."""
    entry = manifest["model"]
    builder = BUILDERS.get(entry.get("arch"))
    if builder is None:
        raise CaffeError(f"manifest describes arch {entry.get('arch')!r}, expected one of {listed(sorted(BUILDERS))}", path=source)
    model = builder(manifest, msc=msc, path=source)
    load_weights_strictly(model, state_dict, source=source)
    return model.eval()


def load_model(path: str | Path, *, msc: bool = True) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Read a checkpoint (folder or file) and build its model; returns (model, manifest)."""
    state_dict, manifest = read_checkpoint(path)
    return build_model(manifest, state_dict, msc=msc, source=path), manifest
