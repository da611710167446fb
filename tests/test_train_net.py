"""Reading the release's train prototxt: every value the trainer derives from it, and the refusals."""

from __future__ import annotations

from pathlib import Path

import pytest

from converter.errors import CaffeError
from models.deeplab import DeepLabV2MSC, ResNetConfig
from segmentation.solver import read_solver
from segmentation.train_net import BACKBONE_MULTS, HEAD_BIAS_MULTS, HEAD_WEIGHT_MULTS, default_train_net, read_train_net
from segmentation.transforms import TransformParams

COCO_DEFINES = {"EXP": "cocostuff", "NUM_LABELS": "182"}
TRAIN_NET = "cocostuff_deeplabv2_resnet101_msc_train.prototxt"


@pytest.fixture(scope="module")
def resnet101() -> DeepLabV2MSC:
    return DeepLabV2MSC(num_classes=182, config=ResNetConfig.resnet101())


def test_release_train_net_and_solver_give_every_value(shared_reference: Path, resnet101: DeepLabV2MSC) -> None:
    folder = shared_reference / "deeplab_v2"
    net = read_train_net(folder / TRAIN_NET, resnet101, resnet101.config, COCO_DEFINES)
    assert net.transform == TransformParams(
        crop_height=321,
        crop_width=321,
        mirror=True,
        mean_bgr=(104.0, 114.1, 120.1),  # COCO-Stuff's mean (VOC: 104.008, 116.669, 122.675)
        scale_factors=(0.5, 0.75, 1.0, 1.25, 1.5),
        value_scale=1.0,
        ignore_label=255,
    )
    assert net.ignore_label == 255 and net.batch_size == 1
    trainable = dict(resnet101.named_parameters())
    assert set(net.mults) == set(trainable)
    for key, mults in net.mults.items():
        if key.startswith("aspp."):
            assert mults == (HEAD_BIAS_MULTS if key.endswith(".bias") else HEAD_WEIGHT_MULTS), key
        else:
            assert mults == BACKBONE_MULTS, key
    assert HEAD_WEIGHT_MULTS == (10.0, 1.0) and HEAD_BIAS_MULTS == (20.0, 0.0)
    solver = read_solver(folder / "cocostuff_deeplabv2_resnet101_solver.prototxt")
    assert (solver.iter_size * net.batch_size, solver.max_iter, solver.base_lr) == (10, 20000, 2.5e-4)
    assert net.mults == default_train_net(resnet101).mults  # the release's multipliers are the defaults


def test_undefined_placeholders_in_the_release_net_are_named(shared_reference: Path, resnet101: DeepLabV2MSC) -> None:
    with pytest.raises(CaffeError, match="NUM_LABELS"):
        read_train_net(shared_reference / "deeplab_v2" / TRAIN_NET, resnet101, resnet101.config, {"EXP": "x"})


def _edited(shared_reference: Path, tmp_path: Path, old: str, new: str, count: int = 1) -> Path:
    text = (shared_reference / "deeplab_v2" / TRAIN_NET).read_text()
    assert old in text
    path = tmp_path / "train.prototxt"
    path.write_text(text.replace(old, new, count))
    return path


def test_trainable_batchnorm_is_refused(shared_reference: Path, resnet101: DeepLabV2MSC, tmp_path: Path) -> None:
    path = _edited(shared_reference, tmp_path, '\t\tname: "bn_conv1_0"\n\t      lr_mult: 0', '\t\tname: "bn_conv1_0"\n\t      lr_mult: 1', count=-1)
    with pytest.raises(CaffeError, match="bn_conv1.*frozen"):
        read_train_net(path, resnet101, resnet101.config, COCO_DEFINES)


def test_towers_sharing_a_param_must_agree_on_its_multipliers(shared_reference: Path, resnet101: DeepLabV2MSC, tmp_path: Path) -> None:
    text = (shared_reference / "deeplab_v2" / TRAIN_NET).read_text()
    start = text.index('name: "fc1_${EXP}_res05_c0"')
    edited = text[:start] + text[start:].replace("lr_mult: 10", "lr_mult: 5", 1)
    path = tmp_path / "train.prototxt"
    path.write_text(edited)
    with pytest.raises(CaffeError, match="fc1_cocostuff_c0_w"):
        read_train_net(path, resnet101, resnet101.config, COCO_DEFINES)


def test_crop_that_would_blend_labels_is_refused(shared_reference: Path, resnet101: DeepLabV2MSC, tmp_path: Path) -> None:
    path = _edited(shared_reference, tmp_path, "crop_size: 321", "crop_size: 320")
    with pytest.raises(CaffeError, match="32k\\+1.*layer 'data'|layer 'data'.*32k\\+1"):
        read_train_net(path, resnet101, resnet101.config, COCO_DEFINES)


def test_a_net_for_another_depth_is_refused(shared_reference: Path, tmp_path: Path) -> None:
    tiny = DeepLabV2MSC(num_classes=182, config=ResNetConfig.tiny())
    with pytest.raises(CaffeError, match="does not match the model"):
        read_train_net(shared_reference / "deeplab_v2" / TRAIN_NET, tiny, tiny.config, COCO_DEFINES)
