"""Exports of registry-built nets: every supported type ONNX can express in onnxruntime, the one it cannot named,
the real models (UltraFace against its published ONNX twin), and export-caffe's round trip of a build folder."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from converter.caffe.load import load_net
from converter.caffe.prototxt import parse_prototxt_text, prototxt_net
from converter.caffe.wire import write_caffemodel
from converter.checkpoint import read_checkpoint
from converter.cli import main as converter_main
from converter.errors import CaffeError
from converter.export.onnx import CaffeNetGraph, verification_inputs, write_onnx
from converter.layers import INPUT_TYPES, SUPPORTED_TYPES, CaffeNet, build_net
from tests.test_build_real_models import MODELS

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")
pytest.importorskip("onnxscript")

# Types whose registry module uses an operation ONNX (opset 22, torch's dynamo exporter) cannot express.
NOT_EXPRESSIBLE = {"ArgMax": "aten.sort"}  # Caffe's tie order needs a stable sort; ONNX TopK does not promise it

INPUT = 'layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 4 dim: 9 dim: 10 } } }\n'
# One layer (or more) of every supported type, each reading the input or an earlier top.
EVERY_TYPE = INPUT + """
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" convolution_param { num_output: 6 kernel_size: 3 pad: 1 stride: 2 group: 2 } }
layer { name: "dil" type: "Convolution" bottom: "data" top: "dil" convolution_param { num_output: 4 kernel_h: 3 kernel_w: 2 pad_h: 2 pad_w: 1 dilation: 2 bias_term: false } }
layer { name: "deconv" type: "Deconvolution" bottom: "data" top: "deconv" convolution_param { num_output: 4 kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" inner_product_param { num_output: 5 } }
layer { name: "pool_max" type: "Pooling" bottom: "data" top: "pool_max" pooling_param { pool: MAX kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "pool_ave" type: "Pooling" bottom: "data" top: "pool_ave" pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "pool_clip" type: "Pooling" bottom: "data" top: "pool_clip" pooling_param { pool: AVE kernel_size: 2 stride: 2 pad: 1 } }
layer { name: "pool_global" type: "Pooling" bottom: "data" top: "pool_global" pooling_param { pool: AVE global_pooling: true } }
layer { name: "bn" type: "BatchNorm" bottom: "data" top: "bn" batch_norm_param { use_global_stats: true eps: 0.001 } }
layer { name: "scale" type: "Scale" bottom: "bn" top: "scale" scale_param { bias_term: true } }
layer { name: "bias" type: "Bias" bottom: "data" top: "bias" }
layer { name: "relu" type: "ReLU" bottom: "data" top: "relu" relu_param { negative_slope: 0.1 } }
layer { name: "prelu" type: "PReLU" bottom: "data" top: "prelu" }
layer { name: "elu" type: "ELU" bottom: "data" top: "elu" elu_param { alpha: 0.5 } }
layer { name: "sigmoid" type: "Sigmoid" bottom: "data" top: "sigmoid" }
layer { name: "tanh" type: "TanH" bottom: "data" top: "tanh" }
layer { name: "absval" type: "AbsVal" bottom: "data" top: "absval" }
layer { name: "power" type: "Power" bottom: "data" top: "power" power_param { power: 2 scale: 0.5 shift: 1 } }
layer { name: "exp" type: "Exp" bottom: "data" top: "exp" exp_param { base: 2 scale: 0.5 shift: 0.1 } }
layer { name: "log" type: "Log" bottom: "sigmoid" top: "log" log_param { base: 10 scale: 2 shift: 0.5 } }
layer { name: "bnll" type: "BNLL" bottom: "data" top: "bnll" }
layer { name: "threshold" type: "Threshold" bottom: "data" top: "threshold" threshold_param { threshold: 0.2 } }
layer { name: "dropout" type: "Dropout" bottom: "data" top: "dropout" dropout_param { dropout_ratio: 0.3 } }
layer { name: "prod" type: "Eltwise" bottom: "data" bottom: "sigmoid" top: "prod" eltwise_param { operation: PROD } }
layer { name: "sum" type: "Eltwise" bottom: "data" bottom: "tanh" top: "sum" eltwise_param { operation: SUM coeff: 1 coeff: -0.5 } }
layer { name: "max" type: "Eltwise" bottom: "data" bottom: "absval" top: "max" eltwise_param { operation: MAX } }
layer { name: "concat" type: "Concat" bottom: "data" bottom: "sigmoid" top: "concat" concat_param { axis: 1 } }
layer { name: "slice" type: "Slice" bottom: "data" top: "s0" top: "s1" top: "s2" slice_param { axis: 1 slice_point: 1 slice_point: 3 } }
layer { name: "split" type: "Split" bottom: "data" top: "split_a" top: "split_b" }
layer { name: "flatten" type: "Flatten" bottom: "split_a" top: "flatten" }
layer { name: "reshape" type: "Reshape" bottom: "data" top: "reshape" reshape_param { shape { dim: 0 dim: 2 dim: -1 dim: 10 } } }
layer { name: "softmax" type: "Softmax" bottom: "data" top: "softmax" softmax_param { axis: 1 } }
layer { name: "lrn" type: "LRN" bottom: "data" top: "lrn" lrn_param { local_size: 3 alpha: 0.01 beta: 0.75 k: 1.5 } }
layer { name: "lrn_within" type: "LRN" bottom: "data" top: "lrn_within" lrn_param { local_size: 3 alpha: 0.01 beta: 0.75 norm_region: WITHIN_CHANNEL } }
layer { name: "interp_zoom" type: "Interp" bottom: "data" top: "interp_zoom" interp_param { zoom_factor: 2 } }
layer { name: "interp_shrink" type: "Interp" bottom: "data" top: "interp_shrink" interp_param { shrink_factor: 2 } }
layer { name: "crop" type: "Crop" bottom: "data" bottom: "pool_max" top: "crop" crop_param { axis: 2 offset: 1 } }
layer { name: "permute" type: "Permute" bottom: "data" top: "permute" permute_param { order: 0 order: 2 order: 3 order: 1 } }
layer { name: "normalize" type: "Normalize" bottom: "data" top: "normalize" norm_param { across_spatial: false channel_shared: false } }
layer { name: "mvn" type: "MVN" bottom: "data" top: "mvn" mvn_param { normalize_variance: true } }
layer { name: "reduction" type: "Reduction" bottom: "data" top: "reduction" reduction_param { operation: SUMSQ axis: 2 coeff: 0.5 } }
layer { name: "tile" type: "Tile" bottom: "data" top: "tile" tile_param { axis: 1 tiles: 2 } }
layer { name: "silence" type: "Silence" bottom: "split_b" }
"""  # fmt: skip
ARGMAX = INPUT + 'layer { name: "argmax" type: "ArgMax" bottom: "data" top: "argmax" argmax_param { axis: 1 } }\n'


class EveryBlob(nn.Module):
    """A registry net as an export graph whose outputs are all its blobs, so each layer's own top is checked."""

    def __init__(self, net: CaffeNet, feed: dict[str, np.ndarray]) -> None:
        super().__init__()
        self.net = net
        self.input_names = tuple(net.input_names)
        with torch.no_grad():
            blobs = net.run({k: torch.from_numpy(v) for k, v in feed.items()}, keep="all")
        self.output_names = tuple(name for name in blobs if name not in self.input_names)

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        blobs = self.net.run(dict(zip(self.input_names, inputs)), keep="all")
        return tuple(blobs[name] for name in self.output_names)


def _randomized(text: str) -> CaffeNet:
    """The net built from `text` with seeded random weights (variances positive, BatchNorm factor kept)."""
    net = build_net(prototxt_net(text, "every_type.prototxt"))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for key, tensor in net.state_dict().items():
            if key.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
            elif not key.endswith("factor"):
                tensor.copy_(torch.randn(tensor.shape, generator=generator))
    return net


def test_every_expressible_type_exports_and_agrees_in_onnxruntime(tmp_path: Path) -> None:
    net = _randomized(EVERY_TYPE)
    covered = {info.type for info in net.graph.layers} | {entry.type for entry in net.graph.left_out}
    assert covered | {"Input"} == set(SUPPORTED_TYPES) - (INPUT_TYPES - {"Input"}) - set(NOT_EXPRESSIBLE)
    graph = EveryBlob(net, verification_inputs(CaffeNetGraph(net), {}, None)[0]).eval()
    _, checks = write_onnx(graph, tmp_path / "every.onnx", verification_inputs(CaffeNetGraph(net), {}, None))
    checked = {check.blob for check in checks}
    tops = {top for info in net.graph.layers for top in info.tops}
    assert checked == tops and all(check.passed for check in checks)
    assert max(check.scale for check in checks) > 0


def test_a_type_onnx_cannot_express_fails_naming_the_layer(tmp_path: Path) -> None:
    graph = CaffeNetGraph(_randomized(ARGMAX)).eval()
    out = tmp_path / "argmax.onnx"
    with pytest.raises(CaffeError) as raised:
        write_onnx(graph, out, verification_inputs(graph, {}, None))
    assert raised.value.layer == "argmax" and NOT_EXPRESSIBLE["ArgMax"] in raised.value.message
    assert list(tmp_path.iterdir()) == []


def test_export_onnx_cli_refuses_a_type_onnx_cannot_express_in_one_line(tmp_path: Path) -> None:
    prototxt, caffemodel = tmp_path / "argmax.prototxt", tmp_path / "argmax.caffemodel"
    prototxt.write_text(ARGMAX)
    write_caffemodel(caffemodel, parse_prototxt_text(ARGMAX), {})
    built = tmp_path / "built"
    assert _run(["build", "--prototxt", str(prototxt), "--caffemodel", str(caffemodel), "--out", str(built)])[0] == 0
    out = tmp_path / "argmax.onnx"
    code, _, err = _run(["export-onnx", "--checkpoint", str(built), "--out", str(out)])
    assert code == 2 and err.count("\n") == 1 and "layer 'argmax'" in err and "aten.sort" in err, err
    assert not out.exists() and not list(tmp_path.glob("*.json"))


def _export_real(shared_reference: Path, name: str, out: Path) -> tuple[CaffeNet, list]:
    prototxt, caffemodel, _ = MODELS[name]
    folder = shared_reference / "caffe_models"
    graph = CaffeNetGraph(build_net(load_net(folder / caffemodel, folder / prototxt))).eval()
    _, checks = write_onnx(graph, out, verification_inputs(graph, {}, None))
    return graph.net, checks


@pytest.mark.slow  # 2-3 s each; UltraFace (below) runs in `make test`
@pytest.mark.parametrize("name", sorted(set(MODELS) - {"ultraface"}))
def test_real_model_exports_and_agrees_in_onnxruntime(shared_reference: Path, tmp_path: Path, name: str) -> None:
    net, checks = _export_real(shared_reference, name, tmp_path / f"{name}.onnx")
    assert {check.blob for check in checks} == set(net.output_names) and all(check.passed for check in checks)


def test_ultraface_export_agrees_with_its_published_onnx_twin(shared_reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "ultraface.onnx"
    _, checks = _export_real(shared_reference, "ultraface", out)
    assert all(check.passed for check in checks)
    twin = ort.InferenceSession(str(shared_reference / "caffe_models" / "ultraface_rfb320_dilated" /
                                    "version-RFB-320_simplified.onnx"), providers=["CPUExecutionProvider"])
    ours = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    image = ((rng.uniform(0, 255, (1, 3, 240, 320)) - 127) / 128).astype(np.float32)
    theirs = dict(zip([o.name for o in twin.get_outputs()], twin.run(None, {twin.get_inputs()[0].name: image})))
    mine = dict(zip([o.name for o in ours.get_outputs()], ours.run(None, {ours.get_inputs()[0].name: image})))
    for name in ("scores", "boxes"):
        np.testing.assert_allclose(mine[name], theirs[name], atol=1e-4, rtol=1e-4)


SHARED = INPUT + """
layer { name: "conv_a" type: "Convolution" bottom: "data" top: "conv_a" param { name: "w" } param { name: "b" } convolution_param { num_output: 4 kernel_size: 3 pad: 1 } }
layer { name: "conv_b" type: "Convolution" bottom: "conv_a" top: "conv_b" param { name: "w" } param { name: "b" } convolution_param { num_output: 4 kernel_size: 3 pad: 1 } }
layer { name: "bn" type: "BatchNorm" bottom: "conv_b" top: "bn" }
layer { name: "scale" type: "Scale" bottom: "bn" top: "scale" scale_param { bias_term: true } }
layer { name: "prelu" type: "PReLU" bottom: "scale" top: "prelu" }
layer { name: "ip" type: "InnerProduct" bottom: "prelu" top: "ip" inner_product_param { num_output: 3 } }
"""  # fmt: skip


def _run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = converter_main(argv)
    return code, out.getvalue(), err.getvalue()


def test_export_caffe_of_a_build_folder_round_trips_and_writes_shared_weights_per_layer(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    weight, bias = rng.standard_normal((4, 4, 3, 3)).astype(np.float32), rng.standard_normal(4).astype(np.float32)
    blobs = {
        "conv_a": [weight, bias], "conv_b": [weight, bias],
        "bn": [rng.standard_normal(4).astype(np.float32) * 7.5, rng.uniform(1, 2, 4).astype(np.float32) * 7.5,
               np.array([7.5], np.float32)],
        "scale": [rng.standard_normal(4).astype(np.float32), rng.standard_normal(4).astype(np.float32)],
        "prelu": [rng.uniform(0, 0.3, 4).astype(np.float32)],
        "ip": [rng.standard_normal((3, 360)).astype(np.float32), rng.standard_normal(3).astype(np.float32)],
    }  # fmt: skip
    prototxt, caffemodel = tmp_path / "shared.prototxt", tmp_path / "shared.caffemodel"
    prototxt.write_text(SHARED)
    write_caffemodel(caffemodel, parse_prototxt_text(SHARED), blobs)
    built = tmp_path / "built"
    assert _run(["build", "--prototxt", str(prototxt), "--caffemodel", str(caffemodel), "--out", str(built)])[0] == 0
    exported = tmp_path / "exported.caffemodel"
    code, printed, err = _run(["export-caffe", "--checkpoint", str(built), "--out", str(exported)])
    assert code == 0, err
    net = load_net(weights=exported)
    assert net.layer("conv_b").blobs[0].tobytes() == weight.tobytes()  # the shared copy, as Caffe saves it
    assert net.layer("bn").blobs[2].tolist() == [1.0]
    again = tmp_path / "again"
    assert _run(["build", "--prototxt", str(prototxt), "--caffemodel", str(exported), "--out", str(again)])[0] == 0
    ours, theirs = read_checkpoint(built)[0], read_checkpoint(again)[0]
    assert list(ours) == list(theirs)
    assert all(ours[k].dtype == theirs[k].dtype and ours[k].numpy().tobytes() == theirs[k].numpy().tobytes()
               for k in ours)


def test_export_caffe_of_a_build_folder_refuses_a_prototxt_it_does_not_fit(tmp_path: Path) -> None:
    blobs = {"ip": [np.ones((3, 360), np.float32), np.zeros(3, np.float32)]}
    text = INPUT + 'layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" inner_product_param { num_output: 3 } }\n'
    prototxt, caffemodel = tmp_path / "net.prototxt", tmp_path / "net.caffemodel"
    prototxt.write_text(text)
    write_caffemodel(caffemodel, parse_prototxt_text(text), blobs)
    assert _run(["build", "--prototxt", str(prototxt), "--caffemodel", str(caffemodel), "--out",
                 str(tmp_path / "built")])[0] == 0
    other = tmp_path / "other.prototxt"
    other.write_text(text.replace("num_output: 3", "num_output: 5"))
    out = tmp_path / "out.caffemodel"
    code, _, err = _run(["export-caffe", "--checkpoint", str(tmp_path / "built"), "--prototxt", str(other),
                         "--out", str(out)])
    assert code == 2 and err.count("\n") == 1 and "layers.ip.weight" in err
    assert not out.exists()


def test_export_onnx_of_a_build_folder_verifies_against_the_opencv_reference(tmp_path: Path) -> None:
    from verify.cli import main as verify_main
    from verify.opencv_reference import produce_opencv_reference, require_opencv4

    require_opencv4()
    rng = np.random.default_rng(1)
    text = SHARED.replace('param { name: "w" } param { name: "b" } ', "")
    blobs = {
        "conv_a": [rng.standard_normal((4, 4, 3, 3)).astype(np.float32), rng.standard_normal(4).astype(np.float32)],
        "conv_b": [rng.standard_normal((4, 4, 3, 3)).astype(np.float32), rng.standard_normal(4).astype(np.float32)],
        "bn": [rng.standard_normal(4).astype(np.float32), rng.uniform(1, 2, 4).astype(np.float32),
               np.array([1.0], np.float32)],
        "scale": [rng.standard_normal(4).astype(np.float32), rng.standard_normal(4).astype(np.float32)],
        "prelu": [rng.uniform(0, 0.3, 4).astype(np.float32)],
        "ip": [rng.standard_normal((3, 360)).astype(np.float32), rng.standard_normal(3).astype(np.float32)],
    }  # fmt: skip
    prototxt, caffemodel = tmp_path / "net.prototxt", tmp_path / "net.caffemodel"
    prototxt.write_text(text)
    write_caffemodel(caffemodel, parse_prototxt_text(text), blobs)
    built = tmp_path / "built"
    assert _run(["build", "--prototxt", str(prototxt), "--caffemodel", str(caffemodel), "--out", str(built)])[0] == 0
    onnx_path = tmp_path / "net.onnx"
    code, printed, err = _run(["export-onnx", "--checkpoint", str(built), "--out", str(onnx_path)])
    assert code == 0, err
    assert "outputs ip" in printed
    code, _, err = _run(["export-onnx", "--checkpoint", str(built), "--out", str(tmp_path / "x.onnx"), "--dynamic-size"])
    assert code == 2 and "DeepLab" in err and not (tmp_path / "x.onnx").exists()
    feed = {"data": rng.standard_normal((1, 4, 9, 10)).astype(np.float32)}
    reference = produce_opencv_reference(prototxt, caffemodel, feed, tmp_path / "ref.h5")
    out, err_text = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err_text):
        code = verify_main(["--onnx", str(onnx_path), "--reference", str(reference)])
    assert code == 0, err_text.getvalue()
    assert "parity PASS" in out.getvalue() and (tmp_path / "net_parity" / "report.md").is_file()
