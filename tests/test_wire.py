"""The byte-level caffemodel codec: Caffe's exact layout on write, every BlobProto encoding on read."""

from __future__ import annotations

import struct
from pathlib import Path

import h5py
import numpy as np
import pytest

from converter.caffe import wire
from converter.errors import CaffeError
from converter.caffe.caffemodel import read_caffemodel
from converter.caffe.hdf5 import read_hdf5_weights, write_hdf5_weights
from converter.caffe.schema import caffe_pb


def _net(*layers: tuple[str, str]):
    pb = caffe_pb()
    net = pb.NetParameter(name="tiny")
    for name, kind in layers:
        net.layer.add(name=name, type=kind, bottom=["data"], top=[name])
    return net


def _blob_bytes(**fields) -> bytes:
    return caffe_pb().BlobProto(**fields).SerializeToString()


def _decode(data: bytes) -> np.ndarray:
    return wire.decode_blob(memoryview(data), data, 0, len(data), path="mem", layer="l", index=0)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    return bytes(out + bytes([value]))


def _key(number: int, wire_type: int) -> bytes:
    return _varint(number << 3 | wire_type)


def test_write_then_read_gives_equal_arrays_shapes_and_params(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    blobs = {
        "conv": [rng.standard_normal((4, 3, 3, 3), dtype=np.float32), rng.standard_normal(4, dtype=np.float32)],
        "bn": [np.arange(4, dtype=np.float32), np.ones(4, np.float32), np.array([0.5], np.float32)],
        "prelu": [np.array(0.25, dtype=np.float32)],
    }
    net = _net(("conv", "Convolution"), ("bn", "BatchNorm"), ("prelu", "PReLU"), ("relu", "ReLU"))
    net.layer[0].convolution_param.num_output = 4
    net.layer[0].convolution_param.dilation.append(2)
    path = tmp_path / "m.caffemodel"
    wire.write_caffemodel(path, net, blobs)
    read = read_caffemodel(path)
    assert [layer.name for layer in read.layers] == ["conv", "bn", "prelu", "relu"]
    for name, arrays in blobs.items():
        got = read.layer(name).blobs
        assert [b.shape for b in got] == [a.shape for a in arrays]
        assert all(np.array_equal(g, a) for g, a in zip(got, arrays))
    assert read.layer("relu").blobs == ()
    assert list(read.layer("conv").param.convolution_param.dilation) == [2]
    assert len(read.layer("conv").param.blobs) == 0


def test_written_bytes_parse_with_protobuf_as_caffe_blobprotos(tmp_path: Path) -> None:
    weight = np.arange(6, dtype=np.float32).reshape(2, 3)
    path = tmp_path / "m.caffemodel"
    wire.write_caffemodel(path, _net(("fc", "InnerProduct")), {"fc": [weight]})
    parsed = caffe_pb().NetParameter.FromString(path.read_bytes())
    blob = parsed.layer[0].blobs[0]
    assert list(blob.shape.dim) == [2, 3]
    assert list(blob.data) == list(range(6))
    assert not blob.HasField("num")


def test_blob_is_placed_between_param_and_include_like_caffe(tmp_path: Path) -> None:
    net = _net(("fc", "InnerProduct"))
    net.layer[0].param.add(lr_mult=1)
    net.layer[0].include.add(phase=caffe_pb().TEST)
    path = tmp_path / "m.caffemodel"
    wire.write_caffemodel(path, net, {"fc": [np.zeros(2, np.float32)]})
    layer_bytes = caffe_pb().NetParameter.FromString(path.read_bytes()).layer[0].SerializeToString()
    data = path.read_bytes()
    start = data.index(b"\x0a\x02fc")  # the layer's name field
    assert data[start : start + len(layer_bytes)] == layer_bytes  # protobuf's own field order == ours


def test_zero_d_blob_is_written_without_shape_like_caffe(tmp_path: Path) -> None:
    path = tmp_path / "m.caffemodel"
    wire.write_caffemodel(path, _net(("prelu", "PReLU")), {"prelu": [np.array(0.5, np.float32)]})
    blob = caffe_pb().NetParameter.FromString(path.read_bytes()).layer[0].blobs[0]
    assert not blob.HasField("shape")
    assert read_caffemodel(path).layer("prelu").blobs[0].shape == ()


def test_input_layer_param_is_written_at_bvlc_field_143(tmp_path: Path) -> None:
    pb = caffe_pb()
    net = pb.NetParameter(name="n")
    layer = net.layer.add(name="data", type="Input", top=["data"])
    layer.input_param.shape.add().dim.extend([1, 3, 5, 7])
    net.layer.add(name="relu", type="ReLU", bottom=["data"], top=["relu"])
    path = tmp_path / "m.caffemodel"
    wire.write_caffemodel(path, net, {})
    raw = path.read_bytes()
    assert _key(143, wire.LENGTH) in raw and _key(10143, wire.LENGTH) not in raw
    read = read_caffemodel(path)
    assert dict(read.inputs) == {"data": (1, 3, 5, 7)}
    assert not read.layer("data").param.HasField("interp_param")


def test_layer_fields_around_blobs_and_an_alias_before_the_type_are_all_kept() -> None:
    def field(number: int, payload: bytes) -> bytes:
        return _key(number, wire.LENGTH) + _varint(len(payload)) + payload

    blob = field(5, np.arange(2, dtype="<f4").tobytes()) + field(7, field(1, _varint(2)))  # data, shape [2]
    shape = field(1, field(1, _varint(1) + _varint(3)))  # InputParameter.shape.dim packed [1, 3]
    layer = field(143, shape) + field(1, b"data") + field(7, blob) + field(2, b"Input") + field(7, blob)
    layer += field(3, b"x")  # a bottom after the blobs
    raw = wire.scan_net(field(100, layer), "m.caffemodel").layers[0]
    param = caffe_pb().LayerParameter.FromString(raw.param)
    assert (param.name, param.type, list(param.bottom)) == ("data", "Input", ["x"])
    assert list(param.input_param.shape[0].dim) == [1, 3] and len(raw.blobs) == 2


def test_interp_layer_param_stays_at_fork_field_143(tmp_path: Path) -> None:
    pb = caffe_pb()
    net = pb.NetParameter(name="n")
    net.layer.add(name="up", type="Interp", bottom=["x"], top=["up"]).interp_param.zoom_factor = 8
    path = tmp_path / "m.caffemodel"
    wire.write_caffemodel(path, net, {})
    assert _key(143, wire.LENGTH) in path.read_bytes()
    assert read_caffemodel(path).layer("up").param.interp_param.zoom_factor == 8


def test_crop_layer_param_round_trips_through_bvlc_field_144(tmp_path: Path) -> None:
    pb = caffe_pb()
    net = pb.NetParameter(name="n")
    crop = net.layer.add(name="crop", type="Crop", bottom=["a", "b"], top=["crop"])
    crop.crop_param.axis = 1
    crop.crop_param.offset.extend([2, 3])
    path = tmp_path / "m.caffemodel"
    wire.write_caffemodel(path, net, {})
    read = read_caffemodel(path).layer("crop").param.crop_param
    assert (read.axis, list(read.offset)) == (1, [2, 3])


def test_unpacked_float_data_decodes_like_packed() -> None:
    values = np.array([1.5, -2.0, 3.25], np.float32)
    body = b"".join(b"\x2d" + struct.pack("<f", v) for v in values)
    shape = _blob_bytes(shape=caffe_pb().BlobShape(dim=[3]))
    assert np.array_equal(_decode(body + shape), values)


def test_unpacked_data_interleaved_with_other_fields_keeps_every_value() -> None:
    body = b"\x2d" + struct.pack("<f", 1.0) + _blob_bytes(num=1) + b"\x2d" + struct.pack("<f", 2.0)
    body += _blob_bytes(channels=1, height=1, width=2)
    assert np.array_equal(_decode(body), np.array([[[[1.0, 2.0]]]], np.float32))


def test_double_data_is_converted_to_float32() -> None:
    blob = _decode(_blob_bytes(double_data=[0.5, 1.0 / 3.0], shape=caffe_pb().BlobShape(dim=[2])))
    assert blob.dtype == np.float32
    assert np.array_equal(blob, np.array([0.5, 1.0 / 3.0], np.float32))


def test_unpacked_double_data_is_decoded() -> None:
    body = b"".join(b"\x41" + struct.pack("<d", v) for v in (1.0, 2.0))
    assert np.array_equal(_decode(body + _blob_bytes(shape=caffe_pb().BlobShape(dim=[2]))), [1.0, 2.0])


def test_legacy_dims_give_a_4d_shape_even_for_biases() -> None:
    blob = _decode(_blob_bytes(num=1, channels=1, height=1, width=3, data=[1, 2, 3]))
    assert blob.shape == (1, 1, 1, 3)


def test_legacy_dims_win_over_shape_as_in_caffe_blob_fromproto() -> None:
    blob = _decode(_blob_bytes(num=1, channels=1, height=2, width=2, shape=caffe_pb().BlobShape(dim=[4]), data=[0] * 4))
    assert blob.shape == (1, 1, 2, 2)


def test_blob_without_any_shape_is_a_zero_d_single_value() -> None:
    blob = _decode(_blob_bytes(data=[0.25]))
    assert blob.shape == () and float(blob) == 0.25


def test_unpacked_shape_dims_are_accepted() -> None:
    shape = b"\x08\x02\x08\x03"  # BlobShape.dim as two unpacked varints
    body = _blob_bytes(data=[0] * 6) + b"\x3a" + bytes([len(shape)]) + shape
    assert _decode(body).shape == (2, 3)


def test_value_count_that_disagrees_with_shape_names_layer_and_blob() -> None:
    with pytest.raises(CaffeError, match=r"mem: layer 'l': blob 0 holds 5 values but its shape \[2, 3\] needs 6"):
        _decode(_blob_bytes(data=[0] * 5, shape=caffe_pb().BlobShape(dim=[2, 3])))


def test_packed_data_is_a_view_of_the_buffer_not_a_copy() -> None:
    data = _blob_bytes(data=[1, 2, 3, 4], shape=caffe_pb().BlobShape(dim=[4]))
    blob = _decode(data)
    assert blob.base is not None and np.shares_memory(blob, np.frombuffer(data, np.uint8))


def test_unknown_fields_reports_numbers_nested_paths_and_wire_mismatches() -> None:
    pb = caffe_pb()
    layer = pb.LayerParameter(name="c").SerializeToString()
    conv_unknown = b"\xf8\x06\x01"  # field 111 varint, unknown in ConvolutionParameter
    layer += _key(106, wire.LENGTH) + _varint(len(conv_unknown)) + conv_unknown
    layer += _key(999, wire.VARINT) + b"\x05"
    layer += _key(1, wire.VARINT) + b"\x05"  # name sent as a varint
    found = wire.unknown_fields(layer, pb.LayerParameter.DESCRIPTOR)
    assert found == ["convolution_param.111", "999", "name (wire type 0)"]


def test_truncated_layer_names_the_layer_and_byte(tmp_path: Path) -> None:
    path = tmp_path / "m.caffemodel"
    wire.write_caffemodel(path, _net(("conv1", "Convolution")), {"conv1": [np.ones((8, 8), np.float32)]})
    data = path.read_bytes()
    with pytest.raises(CaffeError, match=r"layer 'conv1': not a valid caffemodel at byte \d+ .*truncated"):
        wire.scan_net(data[:-10], path)


def test_failed_write_leaves_no_file_and_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "m.caffemodel"
    with pytest.raises(ValueError):
        wire.write_caffemodel(path, _net(("a", "ReLU"), ("b", "ReLU")), {"b": [np.array(["x"])]})
    assert list(tmp_path.iterdir()) == []


def test_failed_write_keeps_the_previous_file(tmp_path: Path) -> None:
    path = tmp_path / "m.caffemodel"
    path.write_bytes(b"previous")
    with pytest.raises(ValueError):
        wire.write_caffemodel(path, _net(("a", "ReLU")), {"a": [np.array(["x"])]})
    assert path.read_bytes() == b"previous" and len(list(tmp_path.iterdir())) == 1


def test_blobs_for_a_layer_the_net_lacks_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="ghost"):
        wire.write_caffemodel(tmp_path / "m.caffemodel", _net(("a", "ReLU")), {"ghost": [np.zeros(1, np.float32)]})


def test_unwritable_output_folder_is_one_caffe_error(tmp_path: Path) -> None:
    target = tmp_path / "missing" / "m.caffemodel"
    with pytest.raises(CaffeError, match=r"missing/m.caffemodel: cannot write"):
        wire.write_caffemodel(target, _net(("a", "ReLU")), {})


def test_hdf5_weights_round_trip_in_caffe_layout(tmp_path: Path) -> None:
    path = tmp_path / "w.caffemodel.h5"
    blobs = {"conv": [np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2), np.ones(2, np.float32)]}
    write_hdf5_weights(path, blobs)
    with h5py.File(path, "r") as h5:
        assert sorted(h5["data/conv"].keys()) == ["0", "1"]
        assert h5["data/conv/0"].chunks is None
    read = read_hdf5_weights(path)
    assert all(np.array_equal(a, b) for a, b in zip(read.layer("conv").blobs, blobs["conv"]))


def test_hdf5_writer_accepts_a_lazy_iterable(tmp_path: Path) -> None:
    path = tmp_path / "w.h5"
    write_hdf5_weights(path, ((f"l{i}", [np.full(3, i, np.float32)]) for i in range(3)))
    assert [layer.name for layer in read_hdf5_weights(path).layers] == ["l0", "l1", "l2"]
