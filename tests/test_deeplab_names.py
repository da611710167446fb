"""The Caffe-name -> state-dict-key map: release spelling, one row per blob, same keys as the model."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch

from converter.deeplab.names import (
    caffe_block_name,
    config_from_state_dict,
    detect_head_name,
    name_map,
    state_dict_keys,
    tower_copy_names,
    tower_name,
)
from converter.errors import CaffeError
from models.deeplab import DeepLabV2, ResNetConfig


def test_block_names_are_letters_in_res2_res5_and_numbered_in_res3_res4() -> None:
    assert [caffe_block_name(2, i) for i in range(3)] == ["a", "b", "c"]
    assert [caffe_block_name(5, i) for i in range(3)] == ["a", "b", "c"]
    assert [caffe_block_name(3, i) for i in range(4)] == ["a", "b1", "b2", "b3"]
    assert caffe_block_name(4, 22) == "b22"


def test_resnet101_map_has_one_row_per_blob_and_the_release_names() -> None:
    rows = name_map(ResNetConfig.resnet101())
    # 104 backbone convs (1 stem + 33 blocks x 3 + 4 projections), each with BatchNorm (3 blobs) and
    # Scale (2 blobs), plus four head branches (weight, bias).
    assert len(rows) == 104 * 6 + 8
    assert len({(row.layer, row.index) for row in rows}) == len(rows)
    keys = Counter(row.key for row in rows if row.key is not None)
    assert max(keys.values()) == 1
    by_key = {row.key: (row.layer, row.index) for row in rows if row.key}
    assert by_key["backbone.conv1.weight"] == ("conv1", 0)
    assert by_key["backbone.bn1.running_var"] == ("bn_conv1", 1)
    assert by_key["backbone.bn1.bias"] == ("scale_conv1", 1)
    assert by_key["backbone.layer3.22.conv2.weight"] == ("res4b22_branch2b", 0)
    assert by_key["backbone.layer4.2.bn3.weight"] == ("scale5c_branch2c", 0)
    assert by_key["backbone.layer2.0.downsample.0.weight"] == ("res3a_branch1", 0)
    assert by_key["backbone.layer2.0.downsample.1.running_mean"] == ("bn3a_branch1", 0)
    assert by_key["aspp.branches.3.bias"] == ("fc1_voc12_c3", 1)
    factors = [row for row in rows if row.kind == "bn_factor"]
    assert len(factors) == 104 and all(row.index == 2 and row.key is None for row in factors)


@pytest.mark.parametrize("config", [ResNetConfig.tiny(), ResNetConfig.resnet101()], ids=["tiny", "resnet101"])
def test_map_keys_are_exactly_the_model_state_dict_keys(config: ResNetConfig) -> None:
    with torch.device("meta"):
        model = DeepLabV2(num_classes=21, config=config)
    assert state_dict_keys(config) == set(model.state_dict())


def test_tower_copies_take_the_suffix_before_the_head_branch_number() -> None:
    assert tower_copy_names("res4b22_branch2b", "fc1_voc12") == ("res4b22_branch2b_res075", "res4b22_branch2b_res05")
    assert tower_copy_names("fc1_voc12_c2", "fc1_voc12") == ("fc1_voc12_res075_c2", "fc1_voc12_res05_c2")


def test_release_msc_prototxt_has_every_mapped_layer_and_its_tower_copies(shared_reference: Path) -> None:
    from converter.caffe.prototxt import read_prototxt

    net = read_prototxt(shared_reference / "deeplab_v2" / "voc12_resnet101_msc_test_seed_513.prototxt")
    for layer in {row.layer for row in name_map(ResNetConfig.resnet101(), "fc1_voc12")}:
        assert net.has_layer(layer), layer
        assert all(net.has_layer(copy) for copy in tower_copy_names(layer, "fc1_voc12")), layer


def test_config_is_recovered_from_a_state_dict() -> None:
    config = ResNetConfig(blocks=(1, 2, 3, 1), stem_width=8, widths=(4, 8, 8, 16))
    with torch.device("meta"):
        state = DeepLabV2(num_classes=5, config=config).state_dict()
    assert config_from_state_dict(state) == (config, 5)


def test_tower_name_puts_the_suffix_at_the_end_except_on_head_branches() -> None:
    assert tower_name("res2a_branch1", "_res075", "fc1_voc12") == "res2a_branch1_res075"
    assert tower_name("fc1_voc12_c3", "_res05", "fc1_voc12") == "fc1_voc12_res05_c3"
    assert tower_name("fc1_voc12", "_res05", "fc1_voc12") == "fc1_voc12_res05"
    assert tower_name("fc1_voc12_c3", "", "fc1_voc12") == "fc1_voc12_c3"


def test_head_name_is_the_one_head_that_is_not_a_tower_copy() -> None:
    names = ["conv1", "fc1_coco_c0", "fc1_coco_res075_c0", "fc1_coco_res05_c0", "fc1_coco"]
    assert detect_head_name(names) == "fc1_coco"
    assert detect_head_name(["conv1"]) == "fc1_voc12"  # a reference holding no head blob
    with pytest.raises(CaffeError, match="net.prototxt: no ASPP head"):
        detect_head_name(["conv1"], default=None, path="net.prototxt")
    with pytest.raises(CaffeError, match=r"several ASPP heads \(fc1_coco, fc1_voc12\)"):
        detect_head_name(["fc1_voc12_c0", "fc1_coco_c0"])

