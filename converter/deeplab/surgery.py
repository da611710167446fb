"""Net surgery: swap the ASPP head of a converted state dict for a fresh N-class head.

`init.caffemodel` (MS-COCO) carries a head for another label set; training on VOC starts
from its backbone and a new head filled as Caffe's training net fills it (gaussian
std `HEAD_WEIGHT_STD` weights, zero biases), drawn from a seeded generator so runs repeat.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from converter.deeplab.names import HEAD_BRANCHES
from converter.errors import CaffeError
from models.deeplab import HEAD_WEIGHT_STD

HEAD_PREFIX = "aspp."


@dataclass(frozen=True)
class SurgeryReport:
    """What `replace_head` did: keys dropped and created with their shapes, or kept as is."""

    dropped: list[tuple[str, tuple[int, ...]]] = field(default_factory=list)
    created: list[tuple[str, tuple[int, ...]]] = field(default_factory=list)
    kept: bool = False
    source_classes: int = 0
    num_classes: int = 0
    seed: int | None = None

    def as_dict(self) -> dict:
        """JSON-ready form for the checkpoint manifest."""
        return {
            "kept": self.kept,
            "source_classes": self.source_classes,
            "num_classes": self.num_classes,
            "seed": self.seed,
            "dropped": [[key, list(shape)] for key, shape in self.dropped],
            "created": [[key, list(shape)] for key, shape in self.created],
        }


def head_classes(state_dict: dict[str, torch.Tensor]) -> int:
    """Number of classes of the head in `state_dict` (rows of its first branch's weight)."""
    key = f"{HEAD_PREFIX}branches.0.weight"
    if key not in state_dict:
        raise CaffeError(f"state dict has no head: key '{key}' is missing")
    return int(state_dict[key].shape[0])


def replace_head(
    state_dict: dict[str, torch.Tensor], *, num_classes: int, seed: int = 0, keep_if_matching: bool = False
) -> tuple[dict[str, torch.Tensor], SurgeryReport]:
    """Return a new state dict with the backbone of `state_dict` and a fresh `num_classes` head.

    Every `aspp.*` entry is dropped whatever its class count; four 3x3 branches are created
    with the input width of the old head. With `keep_if_matching`, a head that already has
    `num_classes` classes is kept and the report says so. The input is not modified.
    """
    if num_classes < 1:
        raise CaffeError(f"number of classes must be positive, got {num_classes}")
    source_classes = head_classes(state_dict)
    if keep_if_matching and source_classes == num_classes:
        report = SurgeryReport(kept=True, source_classes=source_classes, num_classes=num_classes)
        return dict(state_dict), report
    old_weight = state_dict[f"{HEAD_PREFIX}branches.0.weight"]
    in_channels = int(old_weight.shape[1])
    new_state = {key: value for key, value in state_dict.items() if not key.startswith(HEAD_PREFIX)}
    dropped = [(key, tuple(value.shape)) for key, value in state_dict.items() if key.startswith(HEAD_PREFIX)]
    generator = torch.Generator().manual_seed(seed)
    created = []
    for branch in range(HEAD_BRANCHES):
        weight = torch.randn((num_classes, in_channels, 3, 3), generator=generator, dtype=old_weight.dtype) * HEAD_WEIGHT_STD
        bias = torch.zeros(num_classes, dtype=old_weight.dtype)
        for name, tensor in (("weight", weight), ("bias", bias)):
            key = f"{HEAD_PREFIX}branches.{branch}.{name}"
            new_state[key] = tensor
            created.append((key, tuple(tensor.shape)))
    report = SurgeryReport(
        dropped=dropped, created=created, kept=False, source_classes=source_classes, num_classes=num_classes, seed=seed
    )
    return new_state, report
