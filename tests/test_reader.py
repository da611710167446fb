"""The reader on tiny synthetic files: net description, input forms, V1 upgrade, unknown fields, bad input."""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import pytest

from converter.errors import CaffeError
from converter.caffe.caffemodel import read_caffemodel
from converter.caffe.files import release_pages
from converter.caffe.hdf5 import iter_hdf5_weights, read_hdf5_weights
from converter.caffe.load import load_net, net_definition_text
from converter.caffe.prototxt import parse_prototxt_text, read_prototxt
from converter.caffe.schema import caffe_pb
from converter.caffe.hdf5 import write_hdf5_weights
from converter.caffe.wire import write_caffemodel

PROTOTXT = """
name: "tiny"
input: "data"
input_shape { dim: 1 dim: 3 dim: 8 dim: 6 }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 2 kernel_size: 3 pad: 1 dilation: 2 } }
layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1" batch_norm_param { eps: 1e-4 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "up" type: "Interp" bottom: "conv1" top: "up" interp_param { zoom_factor: 2 } }
"""

V1_PROTOTXT = """
name: "old"
input: "data"
input_dim: 1 input_dim: 1 input_dim: 4 input_dim: 4
layers { name: "conv" type: CONVOLUTION bottom: "data" top: "conv"
         blobs_lr: 1 blobs_lr: 2 weight_decay: 1 weight_decay: 0
         convolution_param { num_output: 2 kernel_size: 1 } }
layers { name: "loss" type: SOFTMAX_LOSS bottom: "conv" bottom: "label" top: "loss" }
"""


def _blobs(seed: int = 0) -> dict[str, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    return {
        "conv1": [rng.standard_normal((2, 3, 3, 3)).astype(np.float32), np.zeros(2, np.float32)],
        "bn1": [np.ones(2, np.float32), np.full(2, 2.0, np.float32), np.array([1.0], np.float32)],
    }


@pytest.fixture()
def tiny(tmp_path: Path) -> tuple[Path, Path]:
    prototxt = tmp_path / "tiny.prototxt"
    prototxt.write_text(PROTOTXT)
    caffemodel = tmp_path / "tiny.caffemodel"
    write_caffemodel(caffemodel, parse_prototxt_text(PROTOTXT), _blobs())
    return prototxt, caffemodel


def test_prototxt_gives_layers_in_order_with_typed_params(tiny: tuple[Path, Path]) -> None:
    net = read_prototxt(tiny[0])
    assert [(layer.name, layer.type) for layer in net.layers] == [
        ("conv1", "Convolution"), ("bn1", "BatchNorm"), ("relu1", "ReLU"), ("up", "Interp")]
    assert net.layer("conv1").bottoms == ("data",) and net.layer("bn1").tops == ("conv1",)
    assert list(net.layer("conv1").param.convolution_param.dilation) == [2]
    assert net.layer("bn1").param.batch_norm_param.eps == pytest.approx(1e-4)
    assert net.layer("up").param.interp_param.zoom_factor == 2
    assert all(layer.blobs == () for layer in net.layers)
    assert dict(net.inputs) == {"data": (1, 3, 8, 6)}


def test_caffemodel_alone_is_a_whole_net(tiny: tuple[Path, Path]) -> None:
    net = load_net(weights=tiny[1])
    assert [layer.name for layer in net.layers] == ["conv1", "bn1", "relu1", "up"]
    assert dict(net.inputs) == {"data": (1, 3, 8, 6)}
    assert np.array_equal(net.layer("conv1").blobs[0], _blobs()["conv1"][0])


def test_blob_arrays_are_writable_and_writing_does_not_touch_the_file(tiny: tuple[Path, Path]) -> None:
    before = tiny[1].read_bytes()
    blob = read_caffemodel(tiny[1]).layer("conv1").blobs[0]
    assert blob.dtype == np.float32 and blob.flags.writeable
    blob[...] = 7
    assert tiny[1].read_bytes() == before


def test_load_net_takes_structure_from_prototxt_and_blobs_by_name(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    deploy = tmp_path / "deploy.prototxt"
    deploy.write_text(PROTOTXT.replace('name: "relu1"', 'name: "relu_renamed"').replace("eps: 1e-4", "eps: 1e-3"))
    net = load_net(weights=tiny[1], prototxt=deploy)
    assert [layer.name for layer in net.layers][2] == "relu_renamed"
    assert net.layer("bn1").param.batch_norm_param.eps == pytest.approx(1e-3)  # the prototxt's, not the model's
    assert np.array_equal(net.layer("bn1").blobs[1], np.full(2, 2.0))
    assert net.path == str(tiny[1])


def test_weights_layers_missing_from_prototxt_are_ignored(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    deploy = tmp_path / "deploy.prototxt"
    deploy.write_text(PROTOTXT.split("layer {")[0] + "layer {" + PROTOTXT.split("layer {")[1])
    net = load_net(weights=tiny[1], prototxt=deploy)
    assert [layer.name for layer in net.layers] == ["conv1"] and len(net.layer("conv1").blobs) == 2


def test_hdf5_weights_load_with_the_prototxt(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    weights = tmp_path / "tiny.caffemodel.h5"
    write_hdf5_weights(weights, _blobs())
    net = load_net(weights=weights, prototxt=tiny[0])
    assert np.array_equal(net.layer("conv1").blobs[0], _blobs()["conv1"][0])
    assert net.layer("relu1").blobs == ()


def test_hdf5_is_recognised_by_content_whatever_the_name(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    weights = tmp_path / "weights.caffemodel"
    write_hdf5_weights(weights, _blobs())
    assert len(load_net(weights=weights, prototxt=tiny[0]).layer("bn1").blobs) == 3


def test_hdf5_blobs_are_lazy_writable_maps_of_the_file(tmp_path: Path) -> None:
    weights = tmp_path / "w.h5"
    write_hdf5_weights(weights, _blobs())
    blob = read_hdf5_weights(weights).layer("conv1").blobs[0]
    assert isinstance(blob.base, np.memmap) and blob.flags.writeable
    blob[...] = 0
    assert np.array_equal(read_hdf5_weights(weights).layer("conv1").blobs[0], _blobs()["conv1"][0])


def _resident_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs /proc to read resident memory")
@pytest.mark.parametrize("kind", ["hdf5", "caffemodel"])
def test_released_blob_pages_leave_memory_and_reload_with_the_same_values(tmp_path: Path, kind: str) -> None:
    values = np.random.default_rng(0).standard_normal((64, 64, 32, 32)).astype(np.float32)  # 16 MiB
    if kind == "hdf5":
        write_hdf5_weights(tmp_path / "w.h5", {"conv": [values]})
        blob = read_hdf5_weights(tmp_path / "w.h5").layer("conv").blobs[0]
    else:
        net = caffe_pb().NetParameter()
        net.layer.add(name="conv", type="Convolution")
        write_caffemodel(tmp_path / "w.caffemodel", net, {"conv": [values]})
        blob = read_caffemodel(tmp_path / "w.caffemodel").layer("conv").blobs[0]
    assert np.array_equal(blob, values)  # touches every page
    touched = _resident_bytes()
    release_pages(blob)
    assert touched - _resident_bytes() > 0.9 * values.nbytes
    assert np.array_equal(blob, values)


def test_release_pages_ignores_arrays_in_memory() -> None:
    values = np.ones(1 << 20, dtype=np.float32)
    release_pages(values)
    assert values.sum() == 1 << 20


def test_hdf5_iterator_yields_layer_by_layer_and_reads_chunked_datasets(tmp_path: Path) -> None:
    weights = tmp_path / "w.h5"
    with h5py.File(weights, "w") as h5:
        h5.create_dataset("data/a/0", data=np.arange(6, dtype=np.float64).reshape(2, 3), chunks=(1, 3), compression="gzip")
        h5.create_dataset("data/b/0", data=np.ones(3, np.float32))
    layers = iter_hdf5_weights(weights)
    name, blobs = next(layers)
    assert name == "a" and blobs[0].dtype == np.float32 and blobs[0].shape == (2, 3)
    assert [name for name, _ in layers] == ["b"]


def test_input_dim_form_declares_four_dims_per_input(tmp_path: Path) -> None:
    path = tmp_path / "v1.prototxt"
    path.write_text(V1_PROTOTXT)
    assert dict(read_prototxt(path).inputs) == {"data": (1, 1, 4, 4)}


def test_input_layer_form_declares_one_shape_per_top_or_one_for_all(tmp_path: Path) -> None:
    path = tmp_path / "n.prototxt"
    path.write_text(
        'layer { name: "in" type: "Input" top: "a" top: "b" input_param { shape { dim: 2 dim: 3 } } }\n'
        'layer { name: "in2" type: "Input" top: "c" top: "d" '
        "input_param { shape { dim: 1 } shape { dim: 4 dim: 5 } } }\n"
    )
    assert dict(read_prototxt(path).inputs) == {"a": (2, 3), "b": (2, 3), "c": (1,), "d": (4, 5)}


def test_input_dim_count_mismatch_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "n.prototxt"
    path.write_text('input: "a" input_dim: 1 input_dim: 2\nlayer { name: "r" type: "ReLU" bottom: "a" top: "r" }\n')
    with pytest.raises(CaffeError, match="1 inputs need 4 input_dim values, found 2"):
        read_prototxt(path)


def test_v1_text_is_upgraded_to_current_types_and_param_specs(tmp_path: Path) -> None:
    path = tmp_path / "v1.prototxt"
    path.write_text(V1_PROTOTXT)
    net = read_prototxt(path)
    assert [layer.type for layer in net.layers] == ["Convolution", "SoftmaxWithLoss"]
    conv = net.layer("conv").param
    assert [(p.lr_mult, p.decay_mult) for p in conv.param] == [(1, 1), (2, 0)]
    assert conv.convolution_param.num_output == 2
    assert net.layer("loss").bottoms == ("conv", "label")


def test_v1_binary_is_upgraded_and_keeps_legacy_blob_shapes(tmp_path: Path) -> None:
    pb = caffe_pb()
    net = pb.NetParameter(name="old")
    layer = net.layers.add(name="ip", type=pb.V1LayerParameter.INNER_PRODUCT, bottom=["x"], top=["ip"])
    layer.blobs.add(num=1, channels=1, height=2, width=3, data=range(6))
    layer.blobs.add(num=1, channels=1, height=1, width=2, data=[7, 8])
    layer.param.extend(["w", "b"])
    path = tmp_path / "old.caffemodel"
    path.write_bytes(net.SerializeToString())
    read = read_caffemodel(path).layer("ip")
    assert read.type == "InnerProduct" and [p.name for p in read.param.param] == ["w", "b"]
    assert [b.shape for b in read.blobs] == [(1, 1, 2, 3), (1, 1, 1, 2)]
    assert np.array_equal(read.blobs[1].reshape(-1), [7, 8])


def test_v0_layer_definitions_are_rejected_naming_the_layer(tmp_path: Path) -> None:
    path = tmp_path / "v0.prototxt"
    path.write_text('layers { layer { name: "conv" type: "conv" } name: "conv" }\n')
    with pytest.raises(CaffeError, match=r"layer 'conv': V0 layer definition"):
        read_prototxt(path)


def test_unknown_binary_fields_are_tolerated_and_reported(tmp_path: Path) -> None:
    pb = caffe_pb()
    layer = pb.LayerParameter(name="conv", type="Convolution").SerializeToString() + b"\xb8\x3e\x01"  # field 999
    data = pb.NetParameter(name="n").SerializeToString() + b"\xa2\x06" + bytes([len(layer)]) + layer
    data += b"\xf8\x06\x05"  # NetParameter field 111
    path = tmp_path / "u.caffemodel"
    path.write_bytes(data)
    net = read_caffemodel(path)
    assert net.layer("conv").type == "Convolution"
    assert net.unknown_fields == ("net: unknown field 111", "layer 'conv': unknown field 999")


def test_unknown_text_fields_are_tolerated_and_reported_with_lines(tmp_path: Path) -> None:
    path = tmp_path / "u.prototxt"
    path.write_text(
        'name: "n"\nfancy_net_option: 3\n'
        'layer {\n  name: "c"\n  type: "Convolution"\n  convolution_param {\n    num_output: 2\n    my_knob: true\n  }\n'
        '  my_param { a: 1 b { c: 2 } }\n}\n'
    )
    net = read_prototxt(path)
    assert net.layer("c").param.convolution_param.num_output == 2
    assert net.unknown_fields == (
        "net: unknown field fancy_net_option (line 2)",
        "layer 'c': unknown field convolution_param.my_knob (line 8)",
        "layer 'c': unknown field my_param (line 10)",
    )


def test_net_definition_text_reproduces_the_definition(tiny: tuple[Path, Path]) -> None:
    net = read_caffemodel(tiny[1])
    again = parse_prototxt_text(net_definition_text(net))
    assert [layer.name for layer in again.layer] == ["conv1", "bn1", "relu1", "up"]
    assert list(again.input) == ["data"] and list(again.input_shape[0].dim) == [1, 3, 8, 6]
    assert not any(len(layer.blobs) for layer in again.layer)


# --------------------------------------------------------------------------- bad input: one line, file and layer


def test_nonexistent_path(tmp_path: Path) -> None:
    with pytest.raises(CaffeError, match=r"nope.caffemodel: no such file$"):
        read_caffemodel(tmp_path / "nope.caffemodel")


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(CaffeError, match="is a directory"):
        load_net(weights=tmp_path)


def test_empty_file(tmp_path: Path) -> None:
    (tmp_path / "e.caffemodel").write_bytes(b"")
    with pytest.raises(CaffeError, match="empty file"):
        read_caffemodel(tmp_path / "e.caffemodel")


def test_truncated_caffemodel_names_the_layer(tiny: tuple[Path, Path]) -> None:
    data = tiny[1].read_bytes()
    tiny[1].write_bytes(data[: len(data) // 2])
    with pytest.raises(CaffeError, match=r"tiny.caffemodel: layer 'conv1': not a valid caffemodel .*truncated") as err:
        read_caffemodel(tiny[1])
    assert "\n" not in str(err.value)


def test_png_is_not_a_caffemodel(tmp_path: Path) -> None:
    path = tmp_path / "image.caffemodel"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    with pytest.raises(CaffeError, match=r"image.caffemodel: (not a valid caffemodel|holds no layers|.*cannot decode)"):
        read_caffemodel(path)


@pytest.mark.parametrize("seed", range(5))
def test_random_bytes_are_not_a_caffemodel(tmp_path: Path, seed: int) -> None:
    path = tmp_path / "random.caffemodel"
    path.write_bytes(np.random.default_rng(seed).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(CaffeError, match=r"random.caffemodel: "):
        read_caffemodel(path)


def test_prototxt_text_given_as_weights_is_refused(tiny: tuple[Path, Path]) -> None:
    with pytest.raises(CaffeError, match=r"tiny.prototxt: "):
        load_net(weights=tiny[0])


def test_prototxt_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.prototxt"
    path.write_text(PROTOTXT.replace("kernel_size: 3", "kernel_size: three"))
    with pytest.raises(CaffeError, match=r"bad.prototxt: line 6: .*three"):
        read_prototxt(path)


def test_prototxt_unbalanced_brace_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.prototxt"
    path.write_text('name: "n"\nlayer {\n  name: "a"\n')
    with pytest.raises(CaffeError, match=r"bad.prototxt: line \d+: "):
        read_prototxt(path)


def test_prototxt_without_layers_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "solver.prototxt"
    path.write_text('base_lr: 0.001\nlr_policy: "poly"\n')
    with pytest.raises(CaffeError, match="defines no layers"):
        read_prototxt(path)


def test_binary_file_given_as_prototxt_is_refused(tiny: tuple[Path, Path]) -> None:
    with pytest.raises(CaffeError, match=r"tiny.caffemodel: "):
        read_prototxt(tiny[1])


def test_wrong_sized_blob_names_file_layer_and_blob(tmp_path: Path) -> None:
    pb = caffe_pb()
    net = pb.NetParameter(name="n")
    layer = net.layer.add(name="conv9", type="Convolution")
    layer.blobs.add(shape=pb.BlobShape(dim=[2, 2]), data=[1, 2, 3])
    path = tmp_path / "w.caffemodel"
    path.write_bytes(net.SerializeToString())
    with pytest.raises(CaffeError, match=r"w.caffemodel: layer 'conv9': blob 0 holds 3 values but its shape \[2, 2\]"):
        read_caffemodel(path)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_weights_name_the_layer(tmp_path: Path, bad: float) -> None:
    blobs = _blobs()
    blobs["bn1"][1][1] = bad
    path = tmp_path / "nan.caffemodel"
    write_caffemodel(path, parse_prototxt_text(PROTOTXT), blobs)
    with pytest.raises(CaffeError, match=r"nan.caffemodel: layer 'bn1': blob 1 holds NaN or inf"):
        read_caffemodel(path)


def test_nan_in_hdf5_weights_names_the_layer(tmp_path: Path) -> None:
    blobs = _blobs()
    blobs["conv1"][0][0, 0, 0, 0] = np.nan
    path = tmp_path / "nan.h5"
    write_hdf5_weights(path, blobs)
    with pytest.raises(CaffeError, match=r"nan.h5: layer 'conv1': blob 0 holds NaN or inf"):
        read_hdf5_weights(path)


def test_hdf5_without_data_group_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as h5:
        h5.create_dataset("weights/conv", data=np.zeros(3))
    with pytest.raises(CaffeError, match=r"other.h5: not Caffe HDF5 weights: no /data group"):
        read_hdf5_weights(path)


def test_hdf5_with_misnamed_blob_datasets_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as h5:
        h5.create_dataset("data/conv/weight", data=np.zeros(3, np.float32))
    with pytest.raises(CaffeError, match=r"other.h5: layer 'conv': blob datasets must be named 0..n-1"):
        read_hdf5_weights(path)


def test_hdf5_with_integer_blobs_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as h5:
        h5.create_dataset("data/conv/0", data=np.zeros(3, np.int32))
    with pytest.raises(CaffeError, match=r"layer 'conv': blob 0 is not a floating-point dataset"):
        read_hdf5_weights(path)


def test_h5_named_file_that_is_not_hdf5_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "fake.h5"
    path.write_bytes(b"not hdf5 at all")
    with pytest.raises(CaffeError, match=r"fake.h5: not an HDF5 file"):
        read_hdf5_weights(path)


def test_hdf5_given_to_read_caffemodel_says_what_it_is(tmp_path: Path) -> None:
    path = tmp_path / "w.caffemodel"
    write_hdf5_weights(path, _blobs())
    with pytest.raises(CaffeError, match="is an HDF5 weights file"):
        read_caffemodel(path)


def test_hdf5_weights_without_prototxt_ask_for_it(tmp_path: Path) -> None:
    path = tmp_path / "w.caffemodel.h5"
    write_hdf5_weights(path, _blobs())
    with pytest.raises(CaffeError, match="give the prototxt too"):
        load_net(weights=path)


def test_load_net_with_nothing_is_an_error() -> None:
    with pytest.raises(CaffeError, match="nothing to load"):
        load_net()


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file(tiny: tuple[Path, Path]) -> None:
    tiny[1].chmod(0)
    try:
        with pytest.raises(CaffeError, match="cannot read"):
            read_caffemodel(tiny[1])
    finally:
        tiny[1].chmod(0o644)


def test_a_file_named_like_hdf5_weights_that_is_not_hdf5_says_so(tmp_path: Path) -> None:
    fake = tmp_path / "w.caffemodel.h5"
    fake.write_text("not hdf5")
    with pytest.raises(CaffeError, match=r"w\.caffemodel\.h5: is named like HDF5 weights but is not an HDF5 file"):
        load_net(weights=fake)
