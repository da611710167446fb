"""Net surgery on the init model: backbone kept, COCO head dropped, a seeded Caffe-filler head created."""

from __future__ import annotations

import pytest
import torch

from converter.errors import CaffeError
from converter.deeplab.surgery import replace_head
from models.deeplab import DeepLabV2, ResNetConfig


def _state(num_classes: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    model = DeepLabV2(num_classes=num_classes, config=ResNetConfig.tiny())
    return {key: value.clone() for key, value in model.state_dict().items()}


def test_surgery_drops_coco_head_and_creates_gaussian_head_for_voc() -> None:
    coco = _state(91)
    in_channels = coco["aspp.branches.0.weight"].shape[1]
    before = {key: value.clone() for key, value in coco.items()}

    voc, report = replace_head(coco, num_classes=21, seed=0)

    assert not report.kept and report.source_classes == 91 and report.num_classes == 21
    assert report.dropped == [(f"aspp.branches.{b}.{n}", (91, in_channels, 3, 3) if n == "weight" else (91,))
                              for b in range(4) for n in ("weight", "bias")]
    assert report.created == [(f"aspp.branches.{b}.{n}", (21, in_channels, 3, 3) if n == "weight" else (21,))
                              for b in range(4) for n in ("weight", "bias")]
    weights = torch.cat([voc[f"aspp.branches.{b}.weight"].flatten() for b in range(4)])
    assert abs(weights.std().item() - 0.01) < 0.001 and abs(weights.mean().item()) < 0.001
    assert all(torch.count_nonzero(voc[f"aspp.branches.{b}.bias"]) == 0 for b in range(4))
    backbone = [key for key in coco if not key.startswith("aspp.")]
    assert all(voc[key] is coco[key] for key in backbone)
    assert all(torch.equal(coco[key], before[key]) for key in before), "the input state dict was modified"
    DeepLabV2(num_classes=21, config=ResNetConfig.tiny()).load_state_dict(voc, strict=True)


def test_surgery_head_is_determined_by_the_seed() -> None:
    coco = _state(91)
    first, _ = replace_head(coco, num_classes=21, seed=7)
    again, _ = replace_head(coco, num_classes=21, seed=7)
    other, _ = replace_head(coco, num_classes=21, seed=8)
    key = "aspp.branches.3.weight"
    assert torch.equal(first[key], again[key])
    assert not torch.equal(first[key], other[key])


def test_surgery_keeps_a_matching_head_only_on_request() -> None:
    voc = _state(21)
    kept, report = replace_head(voc, num_classes=21, keep_if_matching=True)
    assert report.kept and report.dropped == [] and report.created == []
    assert kept["aspp.branches.0.weight"] is voc["aspp.branches.0.weight"]

    replaced, report = replace_head(voc, num_classes=21, seed=0)
    assert not report.kept and len(report.created) == 8
    assert not torch.equal(replaced["aspp.branches.0.weight"], voc["aspp.branches.0.weight"])


def test_surgery_report_serialises_for_the_manifest() -> None:
    _, report = replace_head(_state(91), num_classes=21, seed=3)
    data = report.as_dict()
    assert data["seed"] == 3 and data["source_classes"] == 91 and data["kept"] is False
    assert data["dropped"][0] == ["aspp.branches.0.weight", [91, 128, 3, 3]]


def test_surgery_without_a_head_fails() -> None:
    backbone_only = {key: value for key, value in _state(21).items() if not key.startswith("aspp.")}
    with pytest.raises(CaffeError, match="aspp.branches.0.weight"):
        replace_head(backbone_only, num_classes=21)
