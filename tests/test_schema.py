"""The run-time Caffe schema: built from caffe.proto without protoc, Caffe's field numbers and defaults."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import descriptor_pool

from converter.caffe.schema import caffe_pb, messages_from_descriptor, proto_to_descriptor

# Deliberate differences from the DeepLab-v2 fork's caffe.proto (documented in caffe.proto's header).
FORK_DIFFERENCES = {
    ("MatWriteParameter", "prefix", "label"),  # required there, optional here: same wire format
    ("SolverParameter", "rms_decay", "default_value"),  # BVLC later gave it a default of 0.99
}


def _fields(message_class) -> dict[str, int]:
    return {f.name: f.number for f in message_class.DESCRIPTOR.fields}


def test_schema_is_built_once_and_cached() -> None:
    assert caffe_pb() is caffe_pb()


def test_schema_lives_in_a_private_pool_not_the_default_one() -> None:
    with pytest.raises(KeyError):
        descriptor_pool.Default().FindMessageTypeByName("caffe.NetParameter")


def test_net_parameter_field_numbers_match_caffe() -> None:
    fields = _fields(caffe_pb().NetParameter)
    assert {k: fields[k] for k in ("name", "layers", "input", "input_dim", "input_shape", "state", "layer")} == {
        "name": 1, "layers": 2, "input": 3, "input_dim": 4, "input_shape": 8, "state": 6, "layer": 100}


def test_layer_and_blob_field_numbers_match_caffe_and_the_deeplab_fork() -> None:
    pb = caffe_pb()
    layer = _fields(pb.LayerParameter)
    assert (layer["blobs"], layer["convolution_param"], layer["batch_norm_param"], layer["scale_param"]) == (7, 106, 139, 142)
    assert layer["interp_param"] == 143
    assert _fields(pb.V1LayerParameter)["blobs"] == 6
    assert _fields(pb.BlobProto) == {"shape": 7, "data": 5, "diff": 6, "double_data": 8, "double_diff": 9,
                                     "num": 1, "channels": 2, "height": 3, "width": 4}
    assert _fields(pb.InterpParameter) == {"height": 1, "width": 2, "zoom_factor": 3, "shrink_factor": 4,
                                           "pad_beg": 5, "pad_end": 6}
    assert pb.BlobProto.DESCRIPTOR.fields_by_name["data"].GetOptions().packed


def test_defaults_match_caffe() -> None:
    pb = caffe_pb()
    layer = pb.LayerParameter()
    assert np.float32(layer.batch_norm_param.eps) == np.float32(1e-5)
    assert np.float32(layer.batch_norm_param.moving_average_fraction) == np.float32(0.999)
    assert layer.convolution_param.bias_term and layer.convolution_param.group == 1
    assert layer.pooling_param.stride == 1 and layer.pooling_param.pool == pb.PoolingParameter.MAX
    assert layer.pooling_param.round_mode == pb.PoolingParameter.CEIL
    assert (layer.interp_param.zoom_factor, layer.interp_param.shrink_factor) == (1, 1)
    assert layer.convolution_param.weight_filler.type == "constant"
    assert layer.eltwise_param.operation == pb.EltwiseParameter.SUM
    assert pb.ParamSpec().lr_mult == 1.0 and pb.NetState().phase == pb.TEST
    assert pb.SolverParameter().type == "SGD"


def test_enums_are_reachable_like_generated_code() -> None:
    pb = caffe_pb()
    assert pb.Phase.Name(pb.TEST) == "TEST"
    assert pb.V1LayerParameter.LayerType.Value("CONVOLUTION") == 4 == pb.V1LayerParameter.CONVOLUTION
    assert pb.LRNParameter.WITHIN_CHANNEL == 1


def test_messages_round_trip_through_bytes() -> None:
    pb = caffe_pb()
    net = pb.NetParameter(name="n")
    net.layer.add(name="i", type="Interp").interp_param.shrink_factor = 2
    assert pb.NetParameter.FromString(net.SerializeToString()) == net


def test_schema_agrees_with_the_deeplab_fork_proto_on_every_shared_field(shared_reference: Path) -> None:
    fork = proto_to_descriptor((shared_reference / "deeplab_v2" / "deeplab_v2_caffe.proto").read_text(), "fork.proto")
    ours = proto_to_descriptor(resources.files("converter.caffe").joinpath("caffe.proto").read_text(), "caffe.proto")
    fork_messages = {m.name: {f.name: f for f in m.field} for m in fork.message_type}
    compared = 0
    for message in ours.message_type:
        theirs = fork_messages.get(message.name, {})
        for field in message.field:
            if field.name not in theirs:
                continue
            for attribute in ("number", "type", "label", "default_value", "type_name"):
                if (message.name, field.name, attribute) in FORK_DIFFERENCES:
                    continue
                assert getattr(field, attribute) == getattr(theirs[field.name], attribute), (message.name, field.name)
            compared += 1
    assert compared > 400


PROTO = """
syntax = "proto2";
package demo;  // comment
/* block
   comment */
enum Top { A = 0; B = 1; }
message Outer {
  message Inner { optional int32 x = 1 [default = -3]; }
  enum Mode { FAST = 0; SLOW = 1; }
  optional Inner inner = 1;
  optional Mode mode = 2 [default = SLOW];
  repeated int64 dims = 3 [packed = true];
  optional Top top = 4 [default = B];
  optional float f = 5 [default = .5];
  optional string s = 6 [default = "it's"];
  required bool flag = 7;
}
message Other { optional Outer.Inner reused = 1; }
"""


def test_parser_resolves_nested_and_scoped_types() -> None:
    ns = messages_from_descriptor(proto_to_descriptor(PROTO, "demo.proto"))
    outer = ns.Outer()
    assert outer.inner.x == -3 and outer.mode == ns.Outer.SLOW and outer.top == ns.B
    assert outer.f == 0.5 and outer.s == "it's"
    assert ns.Outer.Inner is type(outer.inner)
    assert type(ns.Other().reused).DESCRIPTOR.full_name == "demo.Outer.Inner"
    field = ns.Outer.DESCRIPTOR.fields_by_name["dims"]
    assert field.GetOptions().packed


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ('syntax = "proto3";', r"demo.proto:1: only proto2"),
        ("message A {\n  optional Missing m = 1;\n}", r"A.m: unknown type Missing"),
        ("message A {\n  optional int32 x = 1 [deprecated = true];\n}", r"demo.proto:2: unsupported field option"),
        ("message A {\n  optional int32 x = 1\n}", r"demo.proto:3: expected ;"),
        ("enum E { A = 0; }\nmessage M { optional E e = 1 [default = C]; }", r"M.e: no enum value C"),
        ("message A { optional int32 x = 1 [default = 1.5]; }", r"integer field x has default 1.5"),
        ("message A { @ }", r"demo.proto:1: unexpected character '@'"),
    ],
)
def test_parser_errors_name_file_and_line(source: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        proto_to_descriptor(source, "demo.proto")
