"""Real Caffe outputs (OpenCV's Caffe layer tests, ../shared/reference/caffe_layers_opencv): every case
whose layers the registry supports matches Caffe within the tolerances CASES.md gives."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from converter.caffe.load import load_net
from converter.layers import build_net

# Cases with layer types outside the registry's list (Fast/Faster R-CNN, recurrent nets).
UNSUPPORTED = {"net_roi_pooling": "ROIPooling", "net_faster_rcnn_proposal": "Python (Proposal)", "lstm": "LSTM", "rnn": "RNN"}


def _cases(reference: Path) -> list[dict]:
    return json.loads((reference / "caffe_layers_opencv" / "cases.json").read_text())


def test_every_case_is_either_supported_or_listed_as_unsupported(shared_reference: Path) -> None:
    names = {case["case"] for case in _cases(shared_reference)}
    assert set(UNSUPPORTED) <= names
    assert len(names - set(UNSUPPORTED)) == 20


CASE_NAMES = [
    "layer_softmax", "layer_lrn_spatial", "layer_lrn_channels", "layer_convolution", "layer_deconvolution",
    "layer_inner_product", "layer_pooling_max", "layer_pooling_ave", "layer_mvn", "layer_batch_norm",
    "layer_batch_norm_local_stats", "layer_relu", "layer_dropout", "layer_concat", "layer_concat_optim",
    "layer_concat_shared_input", "layer_eltwise", "layer_prelu", "layer_prelu_fc", "layer_interp",
]  # fmt: skip


@pytest.mark.parametrize("name", CASE_NAMES)
def test_caffe_case_matches_caffe_output(shared_reference: Path, name: str) -> None:
    folder = shared_reference / "caffe_layers_opencv"
    case = next(c for c in _cases(shared_reference) if c["case"] == name)
    caffemodel = folder / case["caffemodel"] if case["caffemodel"] else None
    net = build_net(load_net(caffemodel, folder / case["prototxt"]))
    feeds = {blob: torch.from_numpy(np.load(folder / file)) for blob, file in case["feeds"].items()}
    with torch.no_grad():
        out = net.run(feeds, keep=[case["output_blob"]])[case["output_blob"]].numpy()
    expected = np.load(folder / case["outputs"][0])
    tol = case["tolerance_cpu_fp32"]
    assert out.shape == expected.shape
    diff = np.abs(out.astype(np.float64) - expected)
    assert diff.mean() <= tol["mean_abs"] and diff.max() <= tol["max_abs"], (diff.mean(), diff.max())


def test_repeated_layer_names_each_take_the_weights_of_that_name(shared_reference: Path) -> None:
    """OpenCV's shared_weights net: two layers named 'conv' and two named 'sum' (Caffe allows it)."""
    folder = shared_reference / "caffe_layers_opencv"
    net = build_net(load_net(folder / "shared_weights.caffemodel", folder / "shared_weights.prototxt"))
    first = torch.tensor([[[[0.0, 2.0], [4.0, 6.0]]]])
    second = torch.tensor([[[[1.0, 3.0], [5.0, 7.0]]]])
    with torch.no_grad():
        out = net(input_1=first, input_2=second)["sum"]
    assert out.flatten().tolist() == [12.0, 16.0]
    assert [info.key for info in net.graph.layers if info.name == "conv"] == ["conv", "conv%231"]


def test_old_style_and_input_layer_inputs_mix(shared_reference: Path) -> None:
    net = build_net(load_net(None, shared_reference / "caffe_layers_opencv" / "net_input.prototxt"))
    rng = np.random.default_rng(0)
    feeds = {name: torch.from_numpy(rng.standard_normal(shape).astype(np.float32)) for name, shape in net.graph.inputs.items()}
    with torch.no_grad():
        out = net.run(feeds)["output"]
    first = torch.cat([feeds["old_style_input_blue_green"], feeds["different_name_for_red"]], 1)
    second = torch.cat([feeds["input_layer_blue_green"], feeds["old_style_input_red"]], 1)
    assert torch.equal(out, first + second)


def test_reshape_split_slice_round_trip_is_identity(shared_reference: Path) -> None:
    prototxt = shared_reference / "caffe_layers_opencv" / "reshape_and_slice_routines.prototxt"
    net = build_net(load_net(None, prototxt), input_shapes={"input": (6, 12)})
    x = torch.rand(6, 12) * 2 - 1
    with torch.no_grad():
        assert torch.equal(net(x)["output"], x)
