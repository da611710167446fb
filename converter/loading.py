"""Building a model from a checkpoint: the manifest says which architecture, the weights load strictly.

Kept apart from `converter.checkpoint` (the folder format only), so reading a checkpoint folder
does not need the model code and new architectures are added here in one place.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from converter.checkpoint import ARCH, manifest_path, read_checkpoint
from converter.caffe.prototxt import prototxt_net
from converter.layers import ARCH as CAFFE_NET_ARCH
from converter.layers import build_net, load_plugin
from converter.errors import CaffeError, listed
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
    dtypes = [
        f"{key} {state_dict[key].dtype}" for key, value in expected.items()
        if key in state_dict and value.is_floating_point() and not state_dict[key].is_floating_point()
    ]
    problems = [
        f"{what} {listed(keys)}"
        for what, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", wrong),
                           ("integer values for float parameters", dtypes))
        if keys
    ]
    if problems:
        raise CaffeError("checkpoint does not fit the model: " + "; ".join(problems), path=source)
    model.load_state_dict(dict(state_dict), strict=True)


# Bounds of a DeepLab model entry (far above ResNet-101's), so a hand-edited manifest cannot ask for a
# model that fills the memory: blocks per stage, channel widths, classes.
MAX_BLOCKS, MAX_WIDTH, MAX_CLASSES = 256, 8192, 100_000
_CONFIG_KEYS = ("blocks", "stem_width", "widths")


def deeplab_entry(entry: dict[str, Any], manifest: str | Path) -> tuple[ResNetConfig, int, float]:
    """(config, classes, BatchNorm eps) of a DeepLab manifest model entry, each checked for type and range.

    A CaffeError names `manifest` (the manifest.json) and the field at fault.
    """

    def fail(what: str) -> CaffeError:
        return CaffeError(f"manifest model entry: {what}", path=manifest)

    def count(value: Any, name: str, limit: int) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= limit:
            raise fail(f"{name} is {value!r:.40}, expected a whole number from 1 to {limit}")
        return value

    config = entry.get("config")
    if not isinstance(config, dict) or sorted(config) != sorted(_CONFIG_KEYS):
        raise fail(f"config must be a mapping with exactly {', '.join(_CONFIG_KEYS)}, found {config!r:.80}")
    for name in ("blocks", "widths"):
        if not isinstance(config[name], list) or len(config[name]) != 4:
            raise fail(f"config.{name} is {config[name]!r:.60}, expected a list of 4 numbers")
    blocks = tuple(count(b, "config.blocks[i]", MAX_BLOCKS) for b in config["blocks"])
    widths = tuple(count(w, "config.widths[i]", MAX_WIDTH) for w in config["widths"])
    stem = count(config["stem_width"], "config.stem_width", MAX_WIDTH)
    classes = count(entry.get("num_classes"), "num_classes", MAX_CLASSES)
    eps = entry.get("bn_eps")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not math.isfinite(eps) or eps <= 0:
        raise fail(f"bn_eps is {eps!r:.40}, expected a finite number > 0")
    return ResNetConfig(blocks=blocks, stem_width=stem, widths=widths), classes, float(eps)


def _build_deeplab(manifest: dict[str, Any], *, msc: bool, path: str | Path) -> torch.nn.Module:
    """DeepLab-v2 (multi-scale or single-scale) from the manifest's model entry, weights not loaded yet."""
    config, num_classes, bn_eps = deeplab_entry(manifest["model"], path)
    model_class = DeepLabV2MSC if msc else DeepLabV2
    return model_class(num_classes=num_classes, config=config, bn_eps=bn_eps)


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
    model = builder(manifest, msc=msc, path=manifest_path(source))
    load_weights_strictly(model, state_dict, source=source)
    return model.eval()


def load_model(path: str | Path, *, msc: bool = True) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Read a checkpoint (folder or file) and build its model; returns (model, manifest)."""
    state_dict, manifest = read_checkpoint(path)
    return build_model(manifest, state_dict, msc=msc, source=path), manifest
