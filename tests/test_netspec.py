"""The generated DeepLab-v2 net definitions against the release's prototxts, layer by layer.

Which reference pairs with which kind (../shared/reference/deeplab_v2):
- msc_test     <-> voc12_resnet101_msc_test_seed_321_hdf5 and _513 (data_res05/075, three towers,
                   three heads, Interp, fc_fusion MAX, fc1_interp zoom 8), and the backbone and head
                   of cocostuff_deeplabv2_resnet101_msc_train (everything but the test-only fc1_interp),
                   where the training-only fields (fillers, lr_mult/decay_mult of the head) are compared too.
- single_scale <-> voc12_resnet101_scale1_test_seed (one tower, fc1_voc12, fc1_interp).
The references' data layers (HDF5Data, Input, ImageSegData) and tails (everything reading the label:
SegAccuracy, label_shrink Interp, SoftmaxWithLoss, Accuracy) differ by design and are left out; the
test references omit fillers and the head's lr_mult/decay_mult, so those are compared only with
the training graph.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from converter.synthetic.netspec import deeplab_net_param, deeplab_prototxt
from converter.caffe.prototxt import parse_prototxt_text
from models.deeplab import ASPP_DILATIONS, ResNetConfig

PLACEHOLDERS = {"${NUM_LABELS}": "21", "${EXP}": "voc12"}
DATA_LAYER_TYPES = {"HDF5Data", "Input", "ImageSegData"}


def _reference(shared_reference: Path, name: str):
    text = (shared_reference / "deeplab_v2" / name).read_text()
    for placeholder, value in PLACEHOLDERS.items():
        text = text.replace(placeholder, value)
    return parse_prototxt_text(text, path=name)


def _body(net) -> list:
    """The layers between the data layers and the label-reading tail, in file order."""
    label_blobs = {top for layer in net.layer if layer.type in DATA_LAYER_TYPES for top in layer.top} - {"data"}
    body = []
    for layer in net.layer:
        if layer.type in DATA_LAYER_TYPES:
            continue
        if label_blobs.intersection(layer.bottom):
            label_blobs.update(layer.top)
            continue
        body.append(layer)
    return body


def _without_training_fields(layer, head: str):
    """A copy without the fields the test references leave out: fillers, the head's lr/decay multipliers."""
    copy = type(layer)()
    copy.CopyFrom(layer)
    if copy.HasField("convolution_param"):
        copy.convolution_param.ClearField("weight_filler")
        copy.convolution_param.ClearField("bias_filler")
    if copy.name.startswith(head):
        for spec in copy.param:
            spec.ClearField("lr_mult")
            spec.ClearField("decay_mult")
    return copy


def _assert_same_layers(generated: list, reference: list, strip_training: bool, head: str = "fc1_voc12") -> None:
    assert [layer.name for layer in generated] == [layer.name for layer in reference]
    for mine, theirs in zip(generated, reference):
        if strip_training:
            mine, theirs = _without_training_fields(mine, head), _without_training_fields(theirs, head)
        assert mine == theirs, f"layer {mine.name} differs:\n--- generated\n{mine}--- reference\n{theirs}"


@pytest.mark.parametrize(
    "reference_file, size",
    [("voc12_resnet101_msc_test_seed_321_hdf5.prototxt", 321), ("voc12_resnet101_msc_test_seed_513.prototxt", 513)],
)
def test_msc_test_net_matches_reference_layer_by_layer(shared_reference, reference_file, size):
    generated = deeplab_net_param("msc_test", ResNetConfig.resnet101(), input_size=(size, size))
    reference = _body(_reference(shared_reference, reference_file))
    _assert_same_layers(list(generated.layer), reference, strip_training=True)


def test_single_scale_net_matches_scale1_reference_layer_by_layer(shared_reference):
    generated = deeplab_net_param("single_scale", ResNetConfig.resnet101())
    reference = _body(_reference(shared_reference, "voc12_resnet101_scale1_test_seed.prototxt"))
    _assert_same_layers(list(generated.layer), reference, strip_training=True)


def test_msc_backbone_and_head_match_training_graph_with_fillers_and_multipliers(shared_reference):
    generated = [layer for layer in deeplab_net_param("msc_test", ResNetConfig.resnet101()).layer
                 if layer.name != "fc1_interp"]
    reference = _body(_reference(shared_reference, "cocostuff_deeplabv2_resnet101_msc_train.prototxt"))
    _assert_same_layers(generated, reference, strip_training=False)


def test_inputs_are_declared_the_old_way_with_the_requested_size():
    net = deeplab_net_param("msc_test", ResNetConfig.tiny(), input_size=(353, 497))
    assert list(net.input) == ["data"]
    assert [list(shape.dim) for shape in net.input_shape] == [[1, 3, 353, 497]]
    assert not [layer for layer in net.layer if layer.type in DATA_LAYER_TYPES]


def test_prototxt_text_parses_back_to_the_same_net():
    config = ResNetConfig.tiny()
    for kind in ("msc_test", "single_scale", "init"):
        text = deeplab_prototxt(kind, config)
        assert parse_prototxt_text(text) == deeplab_net_param(kind, config)


def test_init_net_carries_a_91_class_coco_head_by_default():
    net = deeplab_net_param("init", ResNetConfig.tiny())
    head = [layer for layer in net.layer if layer.name.startswith("fc1_coco_c")]
    assert [layer.name for layer in head] == [f"fc1_coco_c{i}" for i in range(4)]
    assert {layer.convolution_param.num_output for layer in head} == {91}
    assert [list(layer.convolution_param.dilation) for layer in head] == [[d] for d in ASPP_DILATIONS]
    assert net.layer[-1].name == "fc1_interp" and list(net.layer[-1].bottom) == ["fc1_coco"]


def test_head_name_and_class_count_can_be_overridden():
    net = deeplab_net_param("single_scale", ResNetConfig.tiny(), num_classes=5, head_name="fc1_cocostuff")
    head = [layer for layer in net.layer if layer.name.startswith("fc1_cocostuff_c")]
    assert len(head) == 4 and {layer.convolution_param.num_output for layer in head} == {5}


def test_tiny_config_names_blocks_by_stage_and_feeds_the_head_from_the_last_block():
    net = deeplab_net_param("single_scale", ResNetConfig.tiny())
    eltwise = [layer.name for layer in net.layer if layer.type == "Eltwise"]
    assert eltwise == ["res2a", "res2b", "res3a", "res3b1", "res4a", "res4b1", "res5a", "res5b", "fc1_voc12"]
    assert {tuple(layer.bottom) for layer in net.layer if layer.name.startswith("fc1_voc12_c")} == {("res5b",)}


def test_tower_copies_share_parameters_by_name_with_the_full_resolution_tower():
    net = deeplab_net_param("msc_test", ResNetConfig.tiny())
    by_name = {layer.name: layer for layer in net.layer}
    for layer in net.layer:
        for suffix in ("_res05", "_res075"):
            if layer.name.startswith("fc1_voc12" + suffix + "_c"):
                base = by_name[layer.name.replace(suffix, "")]
            elif layer.name.endswith(suffix) and layer.param:
                base = by_name[layer.name[: -len(suffix)]]
            else:
                continue
            assert [spec.name for spec in layer.param] == [spec.name for spec in base.param], layer.name
            assert layer.bottom[0].endswith(suffix)


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="unknown DeepLab net kind 'train'"):
        deeplab_prototxt("train", ResNetConfig.tiny())
