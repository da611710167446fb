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

from converter.errors import CaffeError
from models.interp import CaffeInterp
from verify.activations import read_activations
from verify.capture import blob_map
from verify.compare import load_model, verify_model
from verify.result import VerificationResult
from verify_case import TinyCase, tiny_case


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> TinyCase:
    return tiny_case(tmp_path_factory)


def _verify_with_trap(case: TinyCase, trap: Callable[[nn.Module], None]) -> VerificationResult:
    """Verify the honest checkpoint's model with `trap` applied to it, passed in as the model under test."""
    with read_activations(case.reference) as reference:
        mapping = blob_map(case.spec.config, reference.order, reference.prototxt)
        model = load_model(case.state_dict, case.spec, multi_scale=mapping.multi_scale, source="test")
        trap(model)
        return verify_model(model, mapping, case.spec.config, reference)


def test_pool1_floor_rounding_is_a_named_shape_mismatch(case) -> None:
    def floor_pool(model: nn.Module) -> None:
        model.backbone.maxpool.ceil_mode = False

    with pytest.raises(CaffeError, match=r"blob shapes differ: 'pool1' reference \(1, 8, 17, 18\) != PyTorch \(1, 8, 17, 17\)"):
        _verify_with_trap(case, floor_pool)


def test_interp_without_aligned_corners_fails_at_the_first_interp(case) -> None:
    def half_pixel(model: nn.Module) -> None:
        for module in model.modules():
            if isinstance(module, CaffeInterp):
                module.forward = lambda x, m=module: F.interpolate(
                    x, size=m.output_size(x.shape[-2], x.shape[-1]), mode="bilinear", align_corners=False
                )

    first = _verify_with_trap(case, half_pixel).first_diverging
    assert first.name in ("data_res05", "data_res075")
    assert first.teacher_inputs == ("data",) and first.teacher_ratio > 1.0


@pytest.mark.parametrize(
    ("blob", "scale", "expected"),
    [("data_res075", 0.75, r"\(1, 3, 49, 49\) != PyTorch \(1, 3, 49, 50\)"),
     ("data_res05", 0.5, r"\(1, 3, 33, 34\) != PyTorch \(1, 3, 32, 34\)")],
)
def test_tower_input_sized_by_a_scale_factor_is_a_named_shape_mismatch(case, blob, scale, expected) -> None:
    # round(s * n) instead of Caffe's shrink (n-1)//s+1 (then zoom): the MSC branch sizes drift
    def scaled(model: nn.Module) -> None:
        model.get_submodule(blob).output_size = lambda h, w: (round(scale * h), round(scale * w))

    with pytest.raises(CaffeError, match=f"'{blob}' reference " + expected):
        _verify_with_trap(case, scaled)


def test_missing_dilation_fails_at_the_first_dilated_conv(case) -> None:
    def undilated(model: nn.Module) -> None:
        for block in model.backbone.layer3:
            block.conv2.dilation, block.conv2.padding = (1, 1), (1, 1)

    first = _verify_with_trap(case, undilated).first_diverging
    assert first.name == "res4a_branch2b"
    assert first.teacher_inputs == ("res4a_branch2a",) and first.teacher_ratio > 1.0


def test_fusion_by_sum_instead_of_max_fails_at_fc_fusion(case) -> None:
    class EltwiseSum(nn.Module):
        def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
            return sum(inputs)

    def summed(model: nn.Module) -> None:
        model.fc_fusion = EltwiseSum()

    first = _verify_with_trap(case, summed).first_diverging
    assert first.name == "fc_fusion" and first.teacher_ratio > 1.0
