"""Each known Caffe trap, reintroduced into the PyTorch model, is caught by verification at the right blob.

The model under test is the honest checkpoint with one trap patched into the built model, verified
against the OpenCV reference of the tiny synthetic net at 65x67 (where pool1's ceil and floor
rounding differ). The BatchNorm traps (moving-average factor, eps with near-eps variances) live in
the checkpoint, not the model: tests/test_compare.py pins them.
"""

from __future__ import annotations

from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import models.interp
import verify.compare
from converter.errors import CaffeError
from verify.result import VerificationResult
from verify_case import TinyCase, tiny_case


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> TinyCase:
    return tiny_case(tmp_path_factory)


def _verify_with_trap(case: TinyCase, monkeypatch: pytest.MonkeyPatch, trap: Callable[[nn.Module], None]) -> VerificationResult:
    honest_load = verify.compare.load_model

    def load_with_trap(*args, **kwargs) -> nn.Module:
        model = honest_load(*args, **kwargs)
        trap(model)
        return model

    monkeypatch.setattr(verify.compare, "load_model", load_with_trap)
    return case.verify()


def test_pool1_floor_rounding_is_a_named_shape_mismatch(case, monkeypatch) -> None:
    def floor_pool(model: nn.Module) -> None:
        model.backbone.maxpool.ceil_mode = False

    with pytest.raises(CaffeError, match=r"blob shapes differ: 'pool1' reference \(1, 8, 17, 18\) != PyTorch \(1, 8, 17, 17\)"):
        _verify_with_trap(case, monkeypatch, floor_pool)


def test_interp_without_aligned_corners_fails_at_the_first_interp(case, monkeypatch) -> None:
    def half_pixel(x: torch.Tensor, out_height: int, out_width: int, **pads: int) -> torch.Tensor:
        return F.interpolate(x, size=(out_height, out_width), mode="bilinear", align_corners=False)

    monkeypatch.setattr(models.interp, "caffe_interp", half_pixel)
    first = case.verify().first_diverging
    assert first.name in ("data_res05", "data_res075")
    assert first.teacher_inputs == ("data",) and first.teacher_ratio > 1.0


@pytest.mark.parametrize(
    ("blob", "scale", "expected"),
    [("data_res075", 0.75, r"\(1, 3, 49, 49\) != PyTorch \(1, 3, 49, 50\)"),
     ("data_res05", 0.5, r"\(1, 3, 33, 34\) != PyTorch \(1, 3, 32, 34\)")],
)
def test_tower_input_sized_by_a_scale_factor_is_a_named_shape_mismatch(case, monkeypatch, blob, scale, expected) -> None:
    # round(s * n) instead of Caffe's shrink (n-1)//s+1 (then zoom): the MSC branch sizes drift
    def scaled(model: nn.Module) -> None:
        model.get_submodule(blob).output_size = lambda h, w: (round(scale * h), round(scale * w))

    with pytest.raises(CaffeError, match=f"'{blob}' reference " + expected):
        _verify_with_trap(case, monkeypatch, scaled)


def test_missing_dilation_fails_at_the_first_dilated_conv(case, monkeypatch) -> None:
    def undilated(model: nn.Module) -> None:
        for block in model.backbone.layer3:
            block.conv2.dilation, block.conv2.padding = (1, 1), (1, 1)

    first = _verify_with_trap(case, monkeypatch, undilated).first_diverging
    assert first.name == "res4a_branch2b"
    assert first.teacher_inputs == ("res4a_branch2a",) and first.teacher_ratio > 1.0


def test_fusion_by_sum_instead_of_max_fails_at_fc_fusion(case, monkeypatch) -> None:
    class EltwiseSum(nn.Module):
        def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
            return sum(inputs)

    def summed(model: nn.Module) -> None:
        model.fc_fusion = EltwiseSum()

    first = _verify_with_trap(case, monkeypatch, summed).first_diverging
    assert first.name == "fc_fusion" and first.teacher_ratio > 1.0
