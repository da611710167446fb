"""The registry builds the DeepLab-v2 nets from their prototxts and agrees with models/deeplab.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from converter.caffe.load import load_net
from converter.caffe.prototxt import read_prototxt
from converter.deeplab.convert import convert_deeplab
from converter.errors import CaffeError
from converter.layers import build_net
from converter.synthetic.weights import calibration_image, write_synthetic_deeplab
from models.deeplab import DeepLabV2MSC, ResNetConfig

CONFIG = ResNetConfig.tiny()
SIZE = (65, 65)


@pytest.fixture(scope="module")
def msc_files(tmp_path_factory: pytest.TempPathFactory):
    return write_synthetic_deeplab(tmp_path_factory.mktemp("msc"), "msc_test", CONFIG, seed=0, input_size=SIZE)


def test_built_msc_net_matches_hand_written_model_on_converted_weights(msc_files) -> None:
    net = load_net(msc_files.caffemodel, msc_files.prototxt)
    built = build_net(net)
    converted = convert_deeplab(net)
    model = DeepLabV2MSC(converted.num_classes, converted.config, converted.bn_eps, align="strict")
    model.load_state_dict(converted.state_dict)
    model.eval()
    image = torch.from_numpy(calibration_image(*SIZE, seed=3))
    with torch.no_grad():
        ours = built(data=image)
        theirs = model(image)
    assert set(ours) == {"fc1_interp"}
    blobs = built.run({"data": image}, keep=["fc_fusion", "fc1_voc12", "fc1_voc12_res05", "fc1_voc12_res075_interp"])
    # Same Caffe semantics from one home each: the values agree exactly.
    assert torch.equal(blobs["fc1_voc12"], theirs.full)
    assert torch.equal(blobs["fc1_voc12_res075_interp"], theirs.scale075)
    assert torch.equal(blobs["fc1_voc12_res05"], theirs.scale05)
    assert torch.equal(blobs["fc_fusion"], theirs.fused)


def test_msc_towers_share_one_parameter_each(msc_files) -> None:
    built = build_net(load_net(msc_files.caffemodel, msc_files.prototxt))
    keys = built.state_dict().keys()
    assert "layers.conv1.weight" in keys and "layers.conv1_res075.weight" not in keys
    assert built.layer_module("conv1_res075").weight is built.layer_module("conv1").weight
    assert built.layer_module("bn_conv1_res05").running_mean is built.layer_module("bn_conv1").running_mean
    info = {layer.name: layer for layer in built.graph.layers}
    assert [s.owner for s in info["conv1_res05"].shared] == ["conv1"]
    assert info["conv1_res05"].parameters == 0 and info["conv1"].parameters > 0
    # Ties survive dtype and device moves (the owners' tensors are replaced there).
    built.double()
    assert built.layer_module("bn_conv1_res05").running_mean is built.layer_module("bn_conv1").running_mean
    assert built.layer_module("bn_conv1").running_mean.dtype == torch.float64


def test_inferred_shapes_equal_the_shapes_a_forward_makes(msc_files) -> None:
    built = build_net(load_net(msc_files.caffemodel, msc_files.prototxt))
    with torch.no_grad():
        blobs = built.run({"data": torch.zeros(1, 3, *SIZE)}, keep="all")
    assert {name: tuple(value.shape) for name, value in blobs.items()} == dict(built.graph.blob_shapes)


def test_release_test_nets_build(shared_reference: Path) -> None:
    folder = shared_reference / "deeplab_v2"
    shapes = {"data": (1, 3, 321, 321)}
    for name, given in (("voc12_resnet101_scale1_test_seed.prototxt", shapes), ("voc12_resnet101_msc_test_seed_513.prototxt", None)):
        built = build_net(read_prototxt(folder / name), input_shapes=given)
        assert built.input_names == ("data",)  # the label input feeds only left-out layers
        (out,) = built.output_names
        assert built.graph.blob_shapes[out][1] == 21
        assert sum(info.parameters for info in built.graph.layers) > 40_000_000
    msc = build_net(read_prototxt(folder / "voc12_resnet101_msc_test_seed_513.prototxt"))
    assert msc.graph.blob_shapes["fc1_interp"] == (1, 21, 513, 513)
    assert {entry.type for entry in msc.graph.left_out} == {"SegAccuracy"}


def test_release_template_builds_with_defines(shared_reference: Path) -> None:
    """The COCO-Stuff test template has ${NUM_LABELS} where numbers go: it builds once --define fills them."""
    prototxt = shared_reference / "deeplab_v2" / "cocostuff_deeplabv2_resnet101_msc_test.prototxt"
    with pytest.raises(CaffeError, match="NUM_LABELS"):
        read_prototxt(prototxt)
    defines = {"NUM_LABELS": "182", "NET_ID": "deeplab", "EXP": "cocostuff", "DATA_ROOT": "d", "TEST_SET": "val",
               "TEST_SET_POSTFIX": "", "FEATURE_DIR": "f", "MODEL_NAME": "m"}
    built = build_net(read_prototxt(prototxt, defines))
    assert built.input_names == ("data",) and built.output_names == ("fc1_interp_argmax",)
    assert built.graph.blob_shapes["fc1_interp"] == (1, 182, 513, 513)
    assert {(e.type, e.reason.split(";")[0]) for e in built.graph.left_out} == {
        ("MatWrite", "loss/accuracy/writer layer, not run at inference"), ("Silence", "consumes its bottoms")}


def test_deeplab_forward_is_finite_for_each_tower(msc_files) -> None:
    built = build_net(load_net(msc_files.caffemodel, msc_files.prototxt))
    with torch.no_grad():
        out = built(torch.from_numpy(calibration_image(*SIZE, seed=1)))["fc1_interp"]
    assert np.isfinite(out.numpy()).all() and out.shape[-2:] == (65, 65)
