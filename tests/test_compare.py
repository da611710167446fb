"""End-to-end noise budget and teacher forcing against the OpenCV reference of a tiny synthetic net."""

from __future__ import annotations

import math

import pytest
import torch

from converter.deeplab.names import name_map
from converter.deeplab.names import caffe_msc_blob_taps
from models.deeplab import DeepLabV2MSC, ResNetConfig
from verify.activations import read_activations, write_activations
from verify.budget import ErrorStats, Tolerance, error_stats
from verify.capture import blob_map, capture_blobs
from verify.compare import TEACHER_FLOOR, ModelSpec, ReferenceBlobs, teacher_forced, verify_state_dict
from verify.teacher import ForcedStep
from verify_case import TinyCase, tiny_case


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> TinyCase:
    return tiny_case(tmp_path_factory)


def test_honest_conversion_passes_both_checks(case: TinyCase) -> None:
    result = case.verify()
    assert result.passed, result.first_diverging
    assert result.first_diverging is None
    rows = {row.name: row for row in result.rows}
    with read_activations(case.reference) as ref:
        assert [row.name for row in result.rows] == [n for n in ref.order if n in rows]
    # every mapped blob of the MSC test net is compared, fc1_interp included (computed from fc_fusion)
    assert {"conv1", "pool1", "res5b", "fc1_voc12", "fc_fusion", "fc1_interp", "res5b_res075", "data_res05"} <= set(rows)
    assert not result.not_in_reference
    forced = {name for name, row in rows.items() if row.teacher is not None}
    assert {"conv1", "pool1", "res2a_branch1", "res4b1_branch2b", "res5b", "fc1_voc12_c3", "fc1_voc12",
            "data_res075", "fc1_voc12_res05_interp", "fc_fusion", "fc1_interp", "conv1_res075", "res2a_res05"} <= forced
    assert "res3a_res075" not in forced  # other towers: stem, first block and head only
    assert max(row.worst_ratio for row in result.rows) < 0.5


def _bn_stat_keys_and_layers(case: TinyCase) -> list[tuple[str, str]]:
    return [(row.key, row.layer) for row in name_map(case.spec.config) if row.kind in ("bn_mean", "bn_var")]


def test_ignored_bn_factor_fails_at_conv1(case: TinyCase) -> None:
    assert case.bn_factors["bn_conv1"] != 1.0
    broken = dict(case.state_dict)
    for key, layer in _bn_stat_keys_and_layers(case):
        broken[key] = broken[key] * case.bn_factors[layer]  # statistics left multiplied by Caffe's factor
    result = case.verify(broken)
    assert not result.passed
    first = result.first_diverging
    assert first.name == "conv1"
    assert first.end_to_end_ratio > 100 and first.teacher_ratio > 100


def test_wrong_bn_eps_fails_at_the_near_eps_blob(case: TinyCase) -> None:
    # eps 2e-5 instead of 1e-5 changes a unit-variance channel by ~5e-6 only; bn_conv1's near-eps
    # channels (variance ~1e-6..3e-5) change by tens of percent, so conv1 fails by far.
    wrong = ModelSpec(case.spec.config, case.spec.num_classes, 2e-5)
    result = case.verify(spec=wrong)
    first = result.first_diverging
    assert first is not None and first.name == "conv1"
    assert first.end_to_end_ratio > 100


def test_teacher_forcing_pins_first_diverging_block(case: TinyCase) -> None:
    # A 2e-5 relative change of one 3x3 conv (res4b1_branch2b) hardly shows end to end
    # downstream, where the fp32 noise has grown; fed the reference's res4b1_branch2a it shows.
    broken = dict(case.state_dict)
    broken["backbone.layer3.1.conv2.weight"] = broken["backbone.layer3.1.conv2.weight"] * (1 + 2e-5)
    result = case.verify(broken)
    first = result.first_diverging
    assert first.name == "res4b1_branch2b"
    assert first.teacher_inputs == ("res4b1_branch2a",) and first.teacher_ratio > 1.0
    rows = {row.name: row for row in result.rows}
    assert rows["res4b1"].teacher_ratio < 1.0  # the block's sum and ReLU, fed reference inputs, are fine


def test_backbone_scope_skips_head_blobs(case: TinyCase) -> None:
    broken = dict(case.state_dict)
    broken["aspp.branches.0.bias"] = broken["aspp.branches.0.bias"] + 1.0  # a different (new) head
    assert not case.verify(broken).passed
    result = case.verify(broken, scope="backbone")
    assert result.passed and result.scope == "backbone"
    skipped = {row.name for row in result.rows if row.status == "skipped"}
    assert {"fc1_voc12_c0", "fc1_voc12", "fc1_voc12_res05_interp", "fc_fusion", "fc1_interp"} <= skipped
    assert "res5b" not in skipped and "data_res075" not in skipped


def test_stage_subset_reference_forces_only_steps_whose_inputs_it_holds(case: TinyCase, tmp_path) -> None:
    keep = ["conv1", "pool1", "res2b", "res3a", "res5b", "fc1_voc12_c0", "fc1_voc12_c1", "fc1_voc12_c2",
            "fc1_voc12_c3", "fc1_voc12"]
    with read_activations(case.reference) as ref:
        subset = write_activations(tmp_path / "subset.h5", producer=ref.producer, prototxt=ref.prototxt,
                                   inputs=ref.inputs, blobs={n: ref.get(n) for n in keep})
    result = case.verify(reference=subset, allow_partial=True)  # it holds no res4 blob at all
    assert result.passed and result.stages_not_compared == ("res4",)
    rows = {row.name: row for row in result.rows}
    assert rows["res3a"].teacher_inputs == ("res2b",)  # whole block: its branch blobs are absent
    assert rows["fc1_voc12"].teacher_inputs == tuple(f"fc1_voc12_c{k}" for k in range(4))
    assert rows["res2b"].teacher is None and rows["res5b"].teacher is None
    assert "res2a" in result.not_in_reference
    # no multi-scale blob in the file: the single-scale model runs, so no tower blob is "missing"
    assert not [n for n in result.not_in_reference if n.endswith(("_res075", "_res05")) or n == "fc_fusion"]


def test_error_stats_are_exact_in_float64() -> None:
    expected = torch.tensor([1.0, -4.0, 2.0])
    actual = torch.tensor([1.0, -4.0, 2.0 + 2**-20])
    stats = error_stats(actual, expected)
    assert stats.max_abs == 2**-20 and stats.scale == 4.0
    assert math.isclose(stats.mean_abs, 2**-20 / 3)


def test_nan_in_a_blob_fails_any_tolerance() -> None:
    stats = error_stats(torch.tensor([math.nan, 1.0]), torch.tensor([0.0, 1.0]))
    assert Tolerance(1.0, 1.0).ratio(stats) == math.inf
    assert Tolerance(1e-6, 1e-6).ratio(ErrorStats(0.0, 0.0, 0.0)) == 0.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_verdict_runs_without_tf32_and_reports_drift_as_information(tmp_path) -> None:
    # The reference here is PyTorch on the CPU (this machine may have no OpenCV 4): the GPU's fp32,
    # with TF32 off, must pass against it; TF32 and bf16 errors are reported, not judged.
    config = ResNetConfig.tiny()
    torch.manual_seed(0)
    model = DeepLabV2MSC(5, config, align="strict").eval()
    for name, buffer in model.named_buffers():
        if name.endswith("running_var"):
            buffer.uniform_(0.5, 2.0)
    data = 50 * torch.randn(1, 3, 65, 65)
    mapping = blob_map(config, caffe_msc_blob_taps(config))
    values = capture_blobs(model, data, mapping, list(mapping.taps))
    reference = write_activations(tmp_path / "ref.h5", producer="pytorch cpu", prototxt="",
                                  inputs={"data": data.numpy()}, blobs={n: v.numpy() for n, v in values.items()})
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    with read_activations(reference) as ref:
        result = verify_state_dict(model.state_dict(), ModelSpec(config, 5, 1e-5), ref, source="test", device="cuda")
    assert result.passed, result.first_diverging
    assert result.device.startswith("cuda (") and result.dtype == "float32 (TF32 off)"
    assert set(result.drift) == {"tf32", "bf16 autocast"}
    assert set(result.drift["bf16 autocast"]) == {"conv1", "pool1", "res2b", "res3b1", "res4b1", "res5b", "fc1_voc12",
                                                  "fc_fusion"}
    assert result.drift["bf16 autocast"]["res5b"] > 1e-4  # bf16 really ran
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == flags


def test_teacher_step_above_the_floor_is_judged_by_its_own_float32_noise(tmp_path) -> None:
    # A step with heavy cancellation: its fp32 error (~1e-4 of scale) exceeds the 1e-5 floor honestly.
    def cancelling_sum(x: torch.Tensor) -> torch.Tensor:
        return (x + 1e4).sum(dim=1, keepdim=True) - 1e4 * x.shape[1]

    step = ForcedStep("y", ("data",), cancelling_sum, "cancelling sum")
    data = torch.randn(1, 4096, 3, 3, generator=torch.Generator().manual_seed(0)) * 100
    exact = cancelling_sum(data.double())
    noise = (cancelling_sum(data) - exact).abs().max()
    for offset, passes in ((0.0, True), (30 * noise, False)):
        path = write_activations(tmp_path / f"ref{passes}.h5", producer="test", prototxt="", inputs={"data": data.numpy()},
                                 blobs={"y": (exact + offset).float().numpy()})
        with read_activations(path) as ref:
            forced = teacher_forced(step, step, ReferenceBlobs(ref, torch.device("cpu")))
        assert TEACHER_FLOOR.ratio(forced.stats) > 1.0 and forced.noise is not None
        assert (forced.ratio <= 1.0) == passes
