"""Blob capture through forward hooks: which module call is which Caffe blob, and nothing copied."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models.deeplab import DeepLabV2MSC, ResNetConfig
from converter.deeplab.names import detect_head_name
from verify.capture import BlobMap, Tap, blob_map, capture_blobs

TEST_TAIL = """
layer { name: "fc_fusion" type: "Eltwise" bottom: "a" bottom: "b" top: "fc_fusion" eltwise_param { operation: MAX } }
layer { name: "fc1_interp" type: "Interp" bottom: "fc_fusion" top: "fc1_interp" interp_param { zoom_factor: 8 } }
"""


@pytest.fixture(scope="module")
def model() -> DeepLabV2MSC:
    torch.manual_seed(0)
    net = DeepLabV2MSC(5, ResNetConfig.tiny(), align="strict").eval()
    for name, buffer in net.named_buffers():  # non-trivial BN statistics
        if name.endswith("running_var"):
            buffer.uniform_(0.5, 2.0)
    return net


@pytest.fixture(scope="module")
def msc_map() -> BlobMap:
    names = ["data_res075", "conv1", "res5b_res05", "fc_fusion", "fc1_interp"]
    return blob_map(ResNetConfig.tiny(), names, TEST_TAIL)


def test_capture_returns_only_requested_blobs_as_the_modules_own_outputs(model, msc_map) -> None:
    x = torch.randn(1, 3, 65, 67)
    seen = []

    def first_output(module: nn.Module, args: object, output: torch.Tensor) -> None:
        seen.append(output)

    handle = model.backbone.maxpool.register_forward_hook(first_output)
    try:
        blobs = capture_blobs(model, x, msc_map, ["pool1", "conv1"])
    finally:
        handle.remove()
    assert set(blobs) == {"pool1", "conv1"}
    assert blobs["pool1"].data_ptr() == seen[0].data_ptr()  # the output itself, no copy
    stem = model.backbone
    with torch.no_grad():
        conv1 = stem.relu(stem.bn1(stem.conv1(x)))
    assert torch.equal(blobs["conv1"], conv1)


def test_tower_blobs_come_from_their_own_call_of_the_shared_modules(model, msc_map) -> None:
    x = torch.randn(1, 3, 65, 67)
    blobs = capture_blobs(model, x, msc_map, ["fc1_voc12", "fc1_voc12_res075", "fc1_voc12_res05", "res5b_res05"])
    with torch.no_grad():
        assert torch.equal(blobs["fc1_voc12"], model.net(x))
        assert torch.equal(blobs["fc1_voc12_res075"], model.net(model.data_res075(x)))
        assert torch.equal(blobs["fc1_voc12_res05"], model.net(model.data_res05(x)))
        assert torch.equal(blobs["res5b_res05"], model.backbone(model.data_res05(x)))


def test_fc1_interp_is_computed_from_fc_fusion_as_the_reference_net_says(model, msc_map) -> None:
    assert msc_map.tails["fc1_interp"].bottom == "fc_fusion"
    assert msc_map.tails["fc1_interp"].describe() == "zoom_factor=8"
    blobs = capture_blobs(model, torch.randn(1, 3, 65, 67), msc_map, ["fc_fusion", "fc1_interp"])
    height, width = blobs["fc_fusion"].shape[-2:]
    assert blobs["fc1_interp"].shape[-2:] == (height + 7 * (height - 1), width + 7 * (width - 1))


def test_on_blob_hands_each_blob_over_and_keeps_nothing(model, msc_map) -> None:
    got = {}
    kept = capture_blobs(model, torch.randn(1, 3, 65, 65), msc_map, ["conv1", "conv1_res05", "fc1_interp"],
                         on_blob=lambda name, value: got.update({name: tuple(value.shape)}))
    assert kept == {}
    assert set(got) == {"conv1", "conv1_res05", "fc1_interp"}
    assert got["conv1"] != got["conv1_res05"]


class _WritesIntoItsTap(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return out.add_(1.0)  # in place into the tapped output


def test_an_in_place_write_into_a_captured_blob_is_detected() -> None:
    mapping = BlobMap(multi_scale=False, head_name="fc1", taps={"conv": Tap("conv")}, tails={})
    with pytest.raises(RuntimeError, match="in place"):
        capture_blobs(_WritesIntoItsTap(), torch.ones(1, 1, 2, 2), mapping, ["conv"])


def test_reference_content_picks_single_or_multi_scale_and_the_head_name() -> None:
    config = ResNetConfig.tiny()
    single = blob_map(config, ["conv1", "res5b", "fc1_coco_c0", "fc1_coco"])
    assert not single.multi_scale and single.head_name == "fc1_coco"
    assert single.taps["fc1_coco_c1"] == Tap("aspp.branches.1", 0)
    msc = blob_map(config, ["conv1_res075", "fc1_voc12_res05_c0", "fc1_voc12_c0"])
    assert msc.multi_scale and msc.taps["fc1_voc12_res05_c0"] == Tap("aspp.branches.0", 2)
    assert detect_head_name(["data", "res5c"]) == "fc1_voc12"


def test_head_blobs_are_the_classifier_and_everything_after_it(msc_map) -> None:
    assert all(msc_map.is_head(n) for n in ("fc1_voc12_c0", "fc1_voc12_res075", "fc1_voc12_res05_interp",
                                             "fc_fusion", "fc1_interp"))
    assert not any(msc_map.is_head(n) for n in ("data_res075", "conv1", "res5b", "res5b_res075"))
