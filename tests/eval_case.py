"""Shared by the evaluation tests: a tiny randomly initialised checkpoint folder and the small pad size."""

from __future__ import annotations

from pathlib import Path

import torch

from converter.checkpoint import new_manifest, write_checkpoint
from models.deeplab import DeepLabV2, ResNetConfig

CONFIG = ResNetConfig.tiny()
PAD = 65  # a valid small pad (32k+1) keeps the tiny model fast; the release's 513 is the default


def write_tiny_checkpoint(folder: Path, num_classes: int = 21, mean_bgr: list[float] | None = None) -> Path:
    """A randomly initialised tiny DeepLab-v2 checkpoint folder (optionally recording a training mean)."""
    torch.manual_seed(0)
    state_dict = DeepLabV2(num_classes=num_classes, config=CONFIG).state_dict()
    model = {"config": {"blocks": list(CONFIG.blocks), "stem_width": CONFIG.stem_width, "widths": list(CONFIG.widths)},
             "num_classes": num_classes, "bn_eps": 1e-5}
    manifest = new_manifest(inputs={}, prototxt_text=None, model=model, surgery=None, coverage=None)
    if mean_bgr is not None:
        manifest["preprocessing"] = {"mean_bgr": mean_bgr}
    write_checkpoint(folder, state_dict, manifest)
    return folder
