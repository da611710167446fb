"""`inspect`'s notes: each place Caffe differs from PyTorch's defaults is named on its layer's row."""

from __future__ import annotations

from converter.caffe.prototxt import prototxt_net
from converter.layers import build_net
from converter.layers.inspect import format_table, inspect_rows

NET = """name: "notes"
input: "data"
input_shape { dim: 1 dim: 2 dim: 5 dim: 5 }
layer { name: "pool" type: "Pooling" bottom: "data" top: "pool" pooling_param { pool: AVE kernel_size: 2 stride: 2 pad: 1 } }
layer { name: "a" type: "Convolution" bottom: "data" top: "a" param { name: "w" } convolution_param { num_output: 2 kernel_size: 3 pad: 2 dilation: 2 group: 2 bias_term: false } }
layer { name: "b" type: "Convolution" bottom: "data" top: "b" param { name: "w" } convolution_param { num_output: 2 kernel_size: 3 pad: 2 dilation: 2 group: 2 bias_term: false } }
layer { name: "sum" type: "Eltwise" bottom: "a" bottom: "b" top: "sum" eltwise_param { coeff: 0.5 coeff: -1 } }
layer { name: "lrn" type: "LRN" bottom: "sum" top: "lrn" lrn_param { norm_region: WITHIN_CHANNEL local_size: 3 } }
layer { name: "soft" type: "Softmax" bottom: "lrn" top: "soft" softmax_param { axis: 3 } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "soft" bottom: "soft" top: "loss" }
"""


def test_inspect_rows_name_each_caffe_specific_behaviour() -> None:
    net = prototxt_net(NET, "notes.prototxt")
    rows = {row.name: row for row in inspect_rows(build_net(net), net)}
    assert rows["(data)"].shape == "1x2x5x5"
    pool = rows["pool"].notes
    assert "ceil rounding: 3x3 (floor would give 3x3)" not in pool  # ceil and floor agree here ...
    assert "last window dropped (it would start in the padding): 4x4 -> 3x3" in pool  # ... but the clip acts
    assert "AVE divisor counts padded cells" in pool
    assert rows["a"].notes == "dilation 2x2; depthwise" and rows["a"].parameters == "18"
    assert rows["b"].notes == "dilation 2x2; depthwise; shares 'w' with a" and rows["b"].parameters == ""
    assert rows["sum"].notes == "SUM with coeff 0.5, -1, left to right"
    assert rows["lrn"].notes == "within 3x3, k unused (Caffe adds 1)"
    assert rows["soft"].notes == "over axis 3"
    assert rows["loss"].notes.startswith("left out: loss/accuracy/writer layer")
    table = format_table(list(rows.values()))
    assert table.splitlines()[0].split() == ["name", "type", "bottoms", "tops", "output", "shape", "params", "notes"]
