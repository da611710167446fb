"""The reader on real Caffe files (../shared/reference): every caffemodel and prototxt there, skipped when absent."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format

from converter.errors import CaffeError
from converter.caffe.caffemodel import read_caffemodel
from converter.caffe.load import load_net
from converter.caffe.prototxt import parse_prototxt_text, read_prototxt
from converter.caffe.schema import caffe_pb
from converter.caffe.wire import write_caffemodel
from conftest import SHARED_REFERENCE

CAFFEMODELS = sorted(SHARED_REFERENCE.glob("caffe_models/*/*.caffemodel")) + sorted(
    SHARED_REFERENCE.glob("caffe_layers_opencv/*.caffemodel")
)
PROTOTXTS = sorted(SHARED_REFERENCE.glob("caffe_models/*/*.prototxt")) + sorted(
    SHARED_REFERENCE.glob("caffe_layers_opencv/*.prototxt")
)
DEEPLAB_NETS = sorted(p for p in SHARED_REFERENCE.glob("deeplab_v2/*.prototxt") if "solver" not in p.name)
V1_FOLDERS = {"lenet_mnist_v1", "cifar10_full_v1", "cifar10_quick_v1"}
V2_CAFFEMODELS = [p for p in CAFFEMODELS if p.parent.name not in V1_FOLDERS]
# The COCO-Stuff templates put ${NUM_LABELS} where a number belongs; the others only inside strings.
TEMPLATE_NUMBERS = {"cocostuff_deeplabv2_resnet101_msc_test.prototxt", "cocostuff_deeplabv2_resnet101_msc_train.prototxt"}


def _ids(paths: list[Path]) -> list[str]:
    return [f"{p.parent.name}/{p.name}" for p in paths]


def _protobuf_blobs(path: Path) -> list[list[np.ndarray]]:
    """The slow, obvious decoding other converters use: full protobuf parse, np.array(blob.data), Caffe's shape rule."""
    net = caffe_pb().NetParameter.FromString(path.read_bytes())
    out = []
    for layer in list(net.layer) + list(net.layers):
        arrays = []
        for blob in layer.blobs:
            legacy = any(blob.HasField(f) for f in ("num", "channels", "height", "width"))
            shape = (blob.num, blob.channels, blob.height, blob.width) if legacy else tuple(blob.shape.dim)
            values = blob.double_data if len(blob.double_data) else blob.data
            arrays.append(np.array(values, dtype=np.float32).reshape(shape))
        out.append(arrays)
    return out


@pytest.mark.parametrize("path", CAFFEMODELS, ids=_ids(CAFFEMODELS))
def test_fast_blob_decoding_matches_a_plain_protobuf_parse(shared_reference: Path, path: Path) -> None:
    net = read_caffemodel(path)
    expected = _protobuf_blobs(path)
    assert len(net.layers) == len(expected)
    for layer, arrays in zip(net.layers, expected):
        assert [b.shape for b in layer.blobs] == [a.shape for a in arrays], layer.name
        assert all(np.array_equal(b, a) for b, a in zip(layer.blobs, arrays)), layer.name


@pytest.mark.parametrize("path", V2_CAFFEMODELS, ids=_ids(V2_CAFFEMODELS))
def test_rewriting_a_real_v2_caffemodel_reproduces_caffes_bytes(shared_reference: Path, path: Path, tmp_path: Path) -> None:
    pb = caffe_pb()
    net = read_caffemodel(path)
    param = pb.NetParameter.FromString(path.read_bytes())
    param.ClearField("layer")
    for layer in net.layers:
        param.layer.add().CopyFrom(layer.param)
    out = tmp_path / "again.caffemodel"
    write_caffemodel(out, param, {layer.name: layer.blobs for layer in net.layers if layer.blobs})
    assert out.read_bytes() == path.read_bytes()


@pytest.mark.parametrize("path", PROTOTXTS, ids=_ids(PROTOTXTS))
def test_every_reference_prototxt_reads(shared_reference: Path, path: Path) -> None:
    net = read_prototxt(path)
    assert net.layers and all(layer.type for layer in net.layers)


@pytest.mark.parametrize("path", DEEPLAB_NETS, ids=_ids(DEEPLAB_NETS))
def test_deeplab_prototxts_parse_with_placeholders_substituted_where_numbers_belong(
    shared_reference: Path, path: Path
) -> None:
    text = path.read_text()
    if path.name in TEMPLATE_NUMBERS:
        text = text.replace("${NUM_LABELS}", "182")
    net = parse_prototxt_text(text, path)
    interps = {layer.name: layer.interp_param for layer in net.layer if layer.type == "Interp"}
    assert len(net.layer) > 400
    if "data_res075" in interps:
        assert (interps["data_res075"].shrink_factor, interps["data_res075"].zoom_factor) == (4, 3)


def test_deeplab_solver_parses_as_a_solver_parameter(shared_reference: Path) -> None:
    solver = caffe_pb().SolverParameter()
    text_format.Parse((shared_reference / "deeplab_v2" / "cocostuff_deeplabv2_resnet101_solver.prototxt").read_text(), solver)
    assert (solver.iter_size, solver.lr_policy, solver.max_iter) == (10, "poly", 20000)
    assert (solver.power, solver.momentum) == (pytest.approx(0.9), pytest.approx(0.9))


@pytest.mark.parametrize("name", sorted(TEMPLATE_NUMBERS))
def test_cocostuff_template_numbers_are_a_syntax_error_with_its_line(shared_reference: Path, name: str) -> None:
    path = shared_reference / "deeplab_v2" / name
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if re.search(r":\s*\$\{NUM_LABELS\}", text))
    with pytest.raises(CaffeError, match=rf"{name}: line {line}: "):
        read_prototxt(path)


def test_deeplab_msc_test_net_declares_its_inputs(shared_reference: Path) -> None:
    net = read_prototxt(shared_reference / "deeplab_v2" / "voc12_resnet101_msc_test_seed_513.prototxt")
    assert net.inputs["data"] == (1, 3, 513, 513)
    assert net.layer("bn_conv1").param.batch_norm_param.use_global_stats
    assert [layer.param.eltwise_param.operation for layer in net.layers if layer.name == "fc_fusion"] == [
        caffe_pb().EltwiseParameter.MAX
    ]


def test_v1_lenet_binary_is_upgraded_with_legacy_4d_blobs(shared_reference: Path) -> None:
    net = read_caffemodel(shared_reference / "caffe_models" / "lenet_mnist_v1" / "lenet_iter_10000.caffemodel")
    assert [layer.type for layer in net.layers][:3] == ["Data", "Convolution", "Pooling"]
    assert [b.shape for b in net.layer("ip1").blobs] == [(1, 1, 500, 800), (1, 1, 1, 500)]
    assert net.layer("loss").type == "SoftmaxWithLoss"


def test_v1_prototxt_keeps_blobs_lr_as_param_specs(shared_reference: Path) -> None:
    net = read_prototxt(shared_reference / "caffe_models" / "lenet_mnist_v1" / "lenet_train_test.prototxt")
    assert [p.lr_mult for p in net.layer("conv1").param.param] == [1, 2]


def test_lenet_train_model_loads_into_its_deploy_prototxt(shared_reference: Path) -> None:
    folder = shared_reference / "caffe_models" / "lenet_mnist_v2"
    net = load_net(weights=folder / "lenet_iter_10000.caffemodel", prototxt=folder / "lenet.prototxt")
    assert net.inputs == {"data": (64, 1, 28, 28)}
    assert [b.shape for b in net.layer("ip2").blobs] == [(10, 500), (10,)]
    assert net.layer("prob").blobs == ()


def test_channel_shared_prelu_slope_is_zero_d(shared_reference: Path) -> None:
    net = read_caffemodel(shared_reference / "caffe_layers_opencv" / "layer_prelu.caffemodel")
    assert net.layer("output").blobs[0].shape == ()
    assert net.layer("prelu_1").blobs[0].shape == (6,)


def test_ultraface_input_layer_and_dilations_read_from_the_binary(shared_reference: Path) -> None:
    net = read_caffemodel(shared_reference / "caffe_models" / "ultraface_rfb320_dilated" / "RFB-320.caffemodel")
    assert net.inputs == {"input": (1, 3, 240, 320)}
    dilations = {d for layer in net.layers if layer.type == "Convolution" for d in layer.param.convolution_param.dilation}
    assert {2, 3, 5} <= dilations
    assert [list(layer.param.permute_param.order) for layer in net.layers if layer.type == "Permute"][0] == [0, 2, 3, 1]


def test_mtcnn_fork_fields_are_reported_not_fatal(shared_reference: Path) -> None:
    net = read_caffemodel(shared_reference / "caffe_models" / "mtcnn_v1" / "det1.caffemodel")
    assert net.unknown_fields == ("layer 'loss1': unknown field softmax_param.3",)


def test_duplicate_layer_names_from_a_real_file_are_all_kept(shared_reference: Path) -> None:
    net = read_caffemodel(shared_reference / "caffe_layers_opencv" / "shared_weights.caffemodel")
    assert [layer.name for layer in net.layers].count("conv") == 2
