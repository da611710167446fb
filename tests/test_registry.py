"""The registry and graph builder: custom types, the key scheme, and every bad net is one CaffeError naming the layer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from converter.caffe.prototxt import prototxt_net
from converter.errors import CaffeError
from converter.layers import LayerSpec, build_net, layer_key, layer_name, register, supported_types, unregister
from tests.registry_nets import RandomNet

INPUT = 'layer { name: "in" type: "Input" top: "data" input_param { shape { dim: 1 dim: 4 dim: 6 dim: 6 } } }\n'


def _net(text: str, blobs: dict | None = None):
    """A Net from prototxt text, blobs attached by layer name (as load_net does)."""
    import dataclasses

    net = prototxt_net(INPUT + text, "net.prototxt")
    blobs = blobs or {}
    layers = tuple(dataclasses.replace(layer, blobs=tuple(blobs.get(layer.name, ()))) for layer in net.layers)
    return dataclasses.replace(net, layers=layers)


def _error(text: str, blobs: dict | None = None) -> str:
    with pytest.raises(CaffeError) as caught:
        build_net(_net(text, blobs))
    message = str(caught.value)
    assert "\n" not in message
    return message


def _conv(name: str, bottom: str, top: str, extra: str = "", param: str = "") -> str:
    return (f'layer {{ name: "{name}" type: "Convolution" bottom: "{bottom}" top: "{top}" {param} '
            f"convolution_param {{ num_output: 2 kernel_size: 3 pad: 1 {extra} }} }}\n")


def test_unknown_type_names_the_layer_its_type_and_the_supported_list() -> None:
    message = _error('layer { name: "odd" type: "Frobnicate" bottom: "data" top: "odd" }\n')
    assert "layer 'odd'" in message and "'Frobnicate'" in message and "Convolution" in message and "--plugin" in message


def test_custom_type_registers_with_the_decorator() -> None:
    @register("Negate")
    def negate(spec: LayerSpec) -> nn.Module:
        spec.bottoms(1)

        class Negate(nn.Module):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return -x

        return Negate()

    try:
        assert "Negate" in supported_types()
        net = build_net(_net('layer { name: "neg" type: "Negate" bottom: "data" top: "neg" }\n'))
        x = torch.randn(1, 4, 6, 6)
        assert torch.equal(net(x)["neg"], -x)
        assert net.graph.layers[0].converter.endswith("negate")
    finally:
        unregister("Negate")
    assert "Negate" not in supported_types()


def test_key_scheme_escapes_dots_and_percent_and_keeps_slashes() -> None:
    for name in ("conv1/dw", "block.1.conv", "a%2Eb", "plain"):
        assert layer_name(layer_key(name)) == name
        assert "." not in layer_key(name)
    text = _conv("conv1/dw", "data", "a") + _conv("block.1", "a", "b")
    blobs = {"conv1/dw": [np.ones((2, 4, 3, 3), np.float32), np.zeros(2, np.float32)],
             "block.1": [np.ones((2, 2, 3, 3), np.float32), np.zeros(2, np.float32)]}
    net = build_net(_net(text, blobs))
    assert set(net.state_dict()) == {"layers.conv1/dw.weight", "layers.conv1/dw.bias", "layers.block%2E1.weight",
                                     "layers.block%2E1.bias"}
    assert [t.shape for t in net.caffe_blobs("block.1")] == [(2, 2, 3, 3), (2,)]


def test_bottom_not_produced_yet_is_refused() -> None:
    assert "bottom 'nowhere' is not produced" in _error(_conv("c", "nowhere", "c"))


def test_a_cycle_is_named_as_one() -> None:
    text = _conv("a", "b_out", "a_out") + _conv("b", "a_out", "b_out")
    message = _error(text)
    assert "layer 'a'" in message and "cycle" in message


def test_duplicate_top_that_is_not_in_place_is_refused() -> None:
    message = _error(_conv("a", "data", "x") + _conv("b", "data", "x"))
    assert "layer 'b'" in message and "top 'x' is already produced by 'a'" in message


def test_in_place_top_overwrites_the_blob_as_in_caffe() -> None:
    net = build_net(_net(_conv("a", "data", "x") + 'layer { name: "r" type: "ReLU" bottom: "x" top: "x" }\n'))
    blobs = net.run({"data": torch.randn(1, 4, 6, 6)}, keep="all")
    assert (blobs["x"] >= 0).all() and net.output_names == ("x",)


@pytest.mark.parametrize(
    ("geometry", "expected"),
    [("kernel_size: 0", "kernel size must be positive"), ("kernel_size: 3 stride: 0", "stride must be positive"),
     ("kernel_size: 3 group: 3", "group 3 does not divide the 4 input channels")],
)
def test_parameter_outside_its_valid_range_is_refused(geometry: str, expected: str) -> None:
    text = f'layer {{ name: "c" type: "Convolution" bottom: "data" top: "c" convolution_param {{ num_output: 3 {geometry} }} }}\n'
    message = _error(text)
    assert "layer 'c'" in message and expected in message


def test_wrong_blob_count_and_shape_are_refused() -> None:
    assert "needs 2 weight blob(s), the weights hold 1" in _error(_conv("c", "data", "c"), {"c": [np.ones((2, 4, 3, 3), np.float32)]})
    bad = {"c": [np.ones((2, 4, 5, 5), np.float32), np.zeros(2, np.float32)]}
    assert "weight blob 0 has shape (2, 4, 5, 5), expected (2, 4, 3, 3)" in _error(_conv("c", "data", "c"), bad)


def test_wrong_bottom_count_is_refused() -> None:
    message = _error('layer { name: "s" type: "Softmax" bottom: "data" bottom: "data" top: "s" }\n')
    assert "layer 's'" in message and "takes 1 bottom(s), got 2" in message


def _shared(second_lr: float = 1.0, second_weight: float = 1.0) -> tuple[str, dict]:
    text = (_conv("a", "data", "a", param='param { name: "w" } param { name: "b" }')
            + _conv("b", "data", "b", param=f'param {{ name: "w" lr_mult: {second_lr} }} param {{ name: "b" }}'))
    bias = np.zeros(2, np.float32)
    blobs = {"a": [np.ones((2, 4, 3, 3), np.float32), bias], "b": [np.full((2, 4, 3, 3), second_weight, np.float32), bias]}
    return text, blobs


def test_shared_params_are_one_tensor() -> None:
    net = build_net(_net(*_shared()))
    assert net.layer_module("b").weight is net.layer_module("a").weight
    assert set(net.state_dict()) == {"layers.a.weight", "layers.a.bias"}
    x = torch.randn(1, 4, 6, 6)
    out = net(x)
    assert torch.equal(out["a"], out["b"])


def test_shared_params_whose_copies_differ_are_refused() -> None:
    message = _error(*_shared(second_weight=2.0))
    assert "layer 'b'" in message and "shared parameter 'w'" in message and "copies differ" in message


def test_shared_params_with_different_lr_mult_are_refused() -> None:
    message = _error(*_shared(second_lr=2.0))
    assert "layer 'b'" in message and "lr_mult 2 here but 1 there" in message


def test_test_phase_leaves_out_train_layers_and_losses_and_lists_them() -> None:
    text = (_conv("c", "data", "c")
            + 'layer { name: "drop_train" type: "Dropout" bottom: "c" top: "c" include { phase: TRAIN } }\n'
            + 'layer { name: "lbl" type: "Input" top: "label" input_param { shape { dim: 1 } } }\n'
            + 'layer { name: "loss" type: "SoftmaxWithLoss" bottom: "c" bottom: "label" top: "loss" }\n')
    net = build_net(_net(text))
    assert {(e.name, e.type) for e in net.graph.left_out} == {("drop_train", "Dropout"), ("loss", "SoftmaxWithLoss")}
    assert net.input_names == ("data",) and net.output_names == ("c",)


def test_data_layer_becomes_an_input_shaped_from_the_command_line() -> None:
    text = 'layer { name: "d" type: "HDF5Data" top: "data2" top: "label" hdf5_data_param { source: "x" batch_size: 1 } }\n'
    text += _conv("c", "data2", "c")
    with pytest.raises(CaffeError, match="--input-shape data2=N,C,H,W"):
        build_net(_net(text))
    net = build_net(_net(text), input_shapes={"data2": (2, 4, 5, 5)})
    assert net.graph.inputs == {"data2": (2, 4, 5, 5)}


def test_stochastic_pooling_is_refused_clearly() -> None:
    message = _error('layer { name: "p" type: "Pooling" bottom: "data" top: "p" pooling_param { pool: STOCHASTIC kernel_size: 2 } }\n')
    assert "layer 'p'" in message and "STOCHASTIC" in message


def test_random_net_helper_round_trips_through_the_binary_format(tmp_path) -> None:
    spec = RandomNet(_conv("c", "data", "c"), {"data": (1, 4, 6, 6)},
                     {"c": [np.ones((2, 4, 3, 3), np.float32), np.arange(2, dtype=np.float32)]})
    prototxt, caffemodel = spec.write(tmp_path)
    from converter.caffe.load import load_net

    net = build_net(load_net(caffemodel, prototxt))
    assert torch.equal(net.caffe_blobs("c")[1], torch.arange(2, dtype=torch.float32))


def test_train_phase_build_uses_batch_statistics_and_dropout() -> None:
    text = ('layer { name: "bn" type: "BatchNorm" bottom: "data" top: "bn" }\n'
            'layer { name: "drop" type: "Dropout" bottom: "bn" top: "drop" dropout_param { dropout_ratio: 0.5 } }\n'
            'layer { name: "test_only" type: "ReLU" bottom: "drop" top: "relu" include { phase: TEST } }\n')
    test = build_net(_net(text))
    train = build_net(_net(text), phase="TRAIN")
    assert test.layer_module("bn").use_global_stats and not train.layer_module("bn").use_global_stats
    assert [i.name for i in train.graph.layers] == ["bn", "drop"] and train.output_names == ("drop",)
    x = torch.randn(2, 4, 6, 6) * 3 + 1
    with torch.no_grad():
        normalised = train(x)["drop"]  # eval(): dropout passes values through; the batch's own statistics
        assert torch.allclose(normalised.mean(dim=(0, 2, 3)), torch.zeros(4), atol=1e-5)
        train.train()
        dropped = train(x)["drop"]
    assert (dropped == 0).any() and torch.allclose(dropped[dropped != 0], 2 * normalised[dropped != 0], atol=1e-6)


@pytest.mark.parametrize(
    ("eps", "factor", "expected"),
    [("eps: -1", 1.0, "eps is -1"), ("", 1e-45, "moving-average factor"), ("", -2.0, "factor is -2")],
)
def test_batch_norm_bad_eps_or_factor_names_the_file_and_layer(eps: str, factor: float, expected: str) -> None:
    text = f'layer {{ name: "bn" type: "BatchNorm" bottom: "data" top: "bn" batch_norm_param {{ {eps} }} }}\n'
    blobs = {"bn": [np.ones(4, np.float32), np.ones(4, np.float32), np.array([factor], np.float32)]}
    message = _error(text, blobs)
    assert message.startswith("net.prototxt: layer 'bn': ") and expected in message
