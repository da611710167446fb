"""DeepLab-v2 net -> state dict: one-to-one, BatchNorm factor and eps, shared towers, errors naming both sides."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from converter.deeplab.convert import convert_deeplab
from converter.deeplab.names import name_map, tower_copy_names
from converter.errors import CaffeError
from converter.caffe.netdesc import Layer, Net
from converter.synthetic.netspec import deeplab_net_param, deeplab_prototxt
from converter.caffe.load import load_net
from converter.caffe.prototxt import parse_prototxt_text
from converter.synthetic.weights import calibration_image, synthetic_blobs, write_synthetic_deeplab
from converter.caffe.wire import write_caffemodel
from models.deeplab import DeepLabV2, DeepLabV2MSC, ResNetConfig

CONFIG = ResNetConfig.tiny()
SIZE = (65, 65)


@pytest.fixture(scope="module")
def msc_files(tmp_path_factory: pytest.TempPathFactory):
    return write_synthetic_deeplab(tmp_path_factory.mktemp("msc"), "msc_test", CONFIG, seed=0, input_size=SIZE)


@pytest.fixture(scope="module")
def msc_net(msc_files) -> Net:
    return load_net(weights=msc_files.caffemodel)


def _edit(net: Net, name: str, **changes) -> Net:
    layers = tuple(dataclasses.replace(l, **changes) if l.name == name else l for l in net.layers)
    return Net(net.name, net.path, net.inputs, layers, net.unknown_fields)


def _without(net: Net, name: str) -> Net:
    return Net(net.name, net.path, net.inputs, tuple(l for l in net.layers if l.name != name), net.unknown_fields)


def _with_blob(net: Net, name: str, index: int, blob: np.ndarray) -> Net:
    """`net` with blob `index` of layer `name` and of its tower copies (where present) replaced."""
    for target in (name, *tower_copy_names(name, "fc1_voc12")):
        if net.has_layer(target):
            blobs = list(net.layer(target).blobs)
            blobs[index] = blob
            net = _edit(net, target, blobs=tuple(blobs))
    return net


def test_msc_net_converts_into_a_strictly_loading_state_dict(msc_net: Net) -> None:
    result = convert_deeplab(msc_net)
    assert result.config == CONFIG and result.num_classes == 21 and result.head_name == "fc1_voc12"
    model = DeepLabV2MSC(num_classes=21, config=CONFIG, bn_eps=result.bn_eps)
    model.load_state_dict(result.state_dict, strict=True)
    rows = name_map(CONFIG)
    assert result.coverage.blobs_consumed == len(rows)
    assert result.coverage.keys_filled == len(result.state_dict)
    mapped_layers = {row.layer for row in rows}
    assert result.coverage.tower_copies_checked == 2 * len(mapped_layers)
    for row in rows:
        if row.kind in ("conv_weight", "scale_weight", "scale_bias", "head_weight", "head_bias"):
            assert np.array_equal(result.state_dict[row.key].numpy(), msc_net.layer(row.layer).blobs[row.index])


def test_weights_are_zero_copy_views_of_the_reader_arrays(msc_net: Net) -> None:
    result = convert_deeplab(msc_net)
    blob = msc_net.layer("res3a_branch2b").blobs[0]
    assert result.state_dict["backbone.layer2.0.conv2.weight"].data_ptr() == blob.ctypes.data


def test_bn_moving_average_factor_divides_statistics(msc_net: Net) -> None:
    result = convert_deeplab(msc_net)
    factors = []
    for row in name_map(CONFIG):
        if row.kind in ("bn_mean", "bn_var"):
            stored, factor = msc_net.layer(row.layer).blobs[row.index], msc_net.layer(row.layer).blobs[2][0]
            factors.append(factor)
            np.testing.assert_allclose(result.state_dict[row.key].numpy(), stored / factor, rtol=1e-6)
    assert min(abs(np.log(factors))) > 0.01, "the fixture needs factors != 1 for this test to bite"


def test_bn_factor_zero_gives_zero_statistics(msc_net: Net) -> None:
    net = _with_blob(msc_net, "bn_conv1", 2, np.zeros(1, np.float32))
    result = convert_deeplab(net)
    assert torch.count_nonzero(result.state_dict["backbone.bn1.running_mean"]) == 0
    assert torch.count_nonzero(result.state_dict["backbone.bn1.running_var"]) == 0


def _eps_prototxt(text: str, eps: float, path: Path) -> Path:
    net_param = parse_prototxt_text(text)
    for layer in net_param.layer:
        if layer.type == "BatchNorm":
            layer.batch_norm_param.eps = eps
    path.write_text(text_format.MessageToString(net_param))
    return path


def test_bn_eps_comes_from_net_definition(tmp_path: Path) -> None:
    # A caffemodel whose own definition says eps 1e-4, and a prototxt that says 1e-3.
    net_param = deeplab_net_param("single_scale", CONFIG, 21, SIZE, "fc1_voc12")
    for layer in net_param.layer:
        if layer.type == "BatchNorm":
            layer.batch_norm_param.eps = 1e-4
    caffemodel = tmp_path / "eps.caffemodel"
    write_caffemodel(caffemodel, net_param, synthetic_blobs(CONFIG, seed=0))
    prototxt = _eps_prototxt(text_format.MessageToString(net_param), 1e-3, tmp_path / "eps.prototxt")

    assert convert_deeplab(load_net(weights=caffemodel)).bn_eps == 1e-4
    result = convert_deeplab(load_net(weights=caffemodel, prototxt=prototxt))
    assert result.bn_eps == 1e-3

    # The fixture has variances near eps, so the eps choice changes the scores measurably.
    image = torch.from_numpy(calibration_image(*SIZE))
    scores = {}
    for eps in (result.bn_eps, 1e-4, 1e-5):
        model = DeepLabV2(num_classes=21, config=CONFIG, bn_eps=eps).eval()
        model.load_state_dict(result.state_dict, strict=True)
        with torch.no_grad():
            scores[eps] = model(image)
    spread = scores[result.bn_eps].abs().max().item()
    assert (scores[result.bn_eps] - scores[1e-4]).abs().max().item() > 1e-3 * spread
    assert (scores[result.bn_eps] - scores[1e-5]).abs().max().item() > 1e-3 * spread


def test_differing_bn_eps_in_one_net_fails(msc_net: Net) -> None:
    layer = msc_net.layer("bn2a_branch2b")
    param = type(layer.param)()
    param.CopyFrom(layer.param)
    param.batch_norm_param.eps = 1e-3
    with pytest.raises(CaffeError, match=r"different eps.*bn2a_branch2b"):
        convert_deeplab(_edit(msc_net, "bn2a_branch2b", param=param))


def test_missing_layer_names_the_layer_and_the_keys_it_fills(msc_net: Net) -> None:
    with pytest.raises(CaffeError, match=r"layer 'scale2a_branch2b': missing layer: needed for backbone\.layer1\.0\.bn2\.weight"):
        convert_deeplab(_without(msc_net, "scale2a_branch2b"))


def test_extra_layer_with_weights_is_named(msc_net: Net) -> None:
    extra = Layer("fc8_extra", "Convolution", ("res5b",), ("fc8_extra",), msc_net.layer("conv1").param,
                  (np.zeros((2, 2, 1, 1), np.float32),))
    net = Net(msc_net.name, msc_net.path, msc_net.inputs, msc_net.layers + (extra,), msc_net.unknown_fields)
    with pytest.raises(CaffeError, match="does not use: fc8_extra"):
        convert_deeplab(net)


def test_shape_mismatch_names_both_sides(msc_net: Net) -> None:
    net = _with_blob(msc_net, "res2a_branch2a", 0, np.zeros((4, 16, 1, 1), np.float32))
    with pytest.raises(CaffeError, match=r"caffe blob res2a_branch2a\[0\] shape \(4, 16, 1, 1\) != "
                                         r"backbone\.layer1\.0\.conv1\.weight \(4, 8, 1, 1\)"):
        convert_deeplab(net)


def test_conv_geometry_other_than_the_models_names_both_sides(msc_net: Net) -> None:
    param = type(msc_net.layer("res4a_branch2b").param)()
    param.CopyFrom(msc_net.layer("res4a_branch2b").param)
    del param.convolution_param.dilation[:]
    param.convolution_param.pad[:] = [1]
    with pytest.raises(CaffeError, match=r"layer 'res4a_branch2b': caffe stride/pad/dilation \(\(1, 1\), \(1, 1\), \(1, 1\)\) "
                                         r"!= backbone\.layer3\.0\.conv2 \(\(1, 1\), \(2, 2\), \(2, 2\)\)"):
        convert_deeplab(_edit(msc_net, "res4a_branch2b", param=param))


def test_prototxt_head_absent_from_the_weights_is_named(msc_files, tmp_path: Path) -> None:
    text = msc_files.prototxt.read_text().replace("fc1_voc12", "fc1_other")
    net = load_net(weights=msc_files.caffemodel, prototxt=_write_text(tmp_path / "other.prototxt", text))
    with pytest.raises(CaffeError, match="layer 'fc1_other_c0': layer has no weights"):
        convert_deeplab(net)


def _write_text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_differing_tower_copy_is_named(msc_net: Net) -> None:
    blob = msc_net.layer("res3b1_branch2b_res05").blobs[0].copy()
    blob.flat[5] += 1e-3
    with pytest.raises(CaffeError, match=r"layer 'res3b1_branch2b_res05': tower copy blob 0 differs from 'res3b1_branch2b'"):
        convert_deeplab(_with_blob(msc_net, "res3b1_branch2b_res05", 0, blob))


def test_tower_copies_must_match_bit_for_bit_not_just_numerically(msc_net: Net) -> None:
    main = msc_net.layer("res3b1_branch2b").blobs[0].copy()
    main.flat[5] = 0.0
    copy = main.copy()
    copy.flat[5] = -0.0  # == 0.0 as a number, other bits
    net = _with_blob(_with_blob(msc_net, "res3b1_branch2b", 0, main), "res3b1_branch2b_res05", 0, copy)
    with pytest.raises(CaffeError, match=r"layer 'res3b1_branch2b_res05': tower copy blob 0 differs"):
        convert_deeplab(net)


def test_tower_copy_with_other_memory_layout_but_same_values_passes(msc_net: Net) -> None:
    main = msc_net.layer("res3b1_branch2b").blobs[0]
    strided = np.asfortranarray(main)
    assert not strided.flags.c_contiguous
    assert convert_deeplab(_with_blob(msc_net, "res3b1_branch2b_res05", 0, strided)).coverage.tower_copies_checked > 0


def test_class_count_other_than_expected_names_the_head(msc_net: Net) -> None:
    with pytest.raises(CaffeError, match="layer 'fc1_voc12_c0': head has 21 classes, expected 5"):
        convert_deeplab(msc_net, num_classes=5)


def test_init_net_head_is_detected_whatever_its_name(tmp_path: Path) -> None:
    files = write_synthetic_deeplab(tmp_path, "init", CONFIG, seed=1, input_size=SIZE)
    result = convert_deeplab(load_net(weights=files.caffemodel))
    assert result.head_name == "fc1_coco" and result.num_classes == 91
    assert result.coverage.tower_copies_checked == 0
    DeepLabV2(num_classes=91, config=CONFIG).load_state_dict(result.state_dict, strict=True)


def test_weights_with_layers_the_prototxt_lacks_are_refused_so_no_tower_goes_unchecked(msc_files, tmp_path: Path) -> None:
    single = _write_text(tmp_path / "single.prototxt", deeplab_prototxt("single_scale", CONFIG, input_size=SIZE))
    net = load_net(weights=msc_files.caffemodel, prototxt=single)  # the MSC weights hold two more towers
    with pytest.raises(CaffeError, match=r"the weights hold layers the net definition lacks: .*_res05"):
        convert_deeplab(net)
