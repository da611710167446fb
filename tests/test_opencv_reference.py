"""The OpenCV oracle: reproduces real Caffe on its layer tests, rewrites shrink Interps with Caffe's sizes,
records in-place blobs after their last writer, keeps forward order, and fails clearly on bad input."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from converter.errors import CaffeError
from converter.caffe.prototxt import parse_prototxt_text, read_prototxt
from converter.caffe.wire import write_caffemodel
from models.interp import caffe_interp, caffe_interp_size
from verify.activations import read_activations
from verify.inputs import caffe_preprocess, synthetic_image
from verify.opencv_reference import main, produce_opencv_reference, require_opencv4, stage_blobs

def _opencv4_missing() -> str | None:
    """Why this machine cannot run the oracle (e.g. the GPU machine's OpenCV 5), or None."""
    try:
        require_opencv4()
    except CaffeError as error:
        return str(error)
    return None


pytestmark = pytest.mark.skipif(_opencv4_missing() is not None, reason=f"no OpenCV Caffe importer: {_opencv4_missing()}")

# OpenCV's own Caffe layer tests whose references real Caffe produced (CASES.md), fed to blob "input".
CAFFE_CASES = [
    "layer_convolution", "layer_deconvolution", "layer_inner_product", "layer_pooling_max", "layer_pooling_ave",
    "layer_batch_norm", "layer_batch_norm_local_stats", "layer_relu", "layer_dropout", "layer_concat",
    "layer_concat_optim", "layer_concat_shared_input", "layer_eltwise", "layer_prelu", "layer_prelu_fc",
    "layer_interp", "layer_softmax", "layer_lrn_channels", "layer_lrn_spatial",
]
MEAN_ABS_TOL, MAX_ABS_TOL = 1e-5, 1e-4  # CASES.md: OpenCV's CPU fp32 thresholds
# A known disagreement (max 0.24 here): DeepLab has no MVN, but the oracle must not be trusted for it.
MVN_EPS_NOTE = "OpenCV's MVN divides by sqrt(var + eps); this 2015 Caffe reference by sqrt(var) + eps"


def _case(shared_reference: Path, name: str) -> dict:
    folder = shared_reference / "caffe_layers_opencv"
    cases = {c["case"]: c for c in json.loads((folder / "cases.json").read_text())}
    return cases[name]


@pytest.mark.parametrize(
    "case",
    CAFFE_CASES
    + [pytest.param("layer_mvn", marks=pytest.mark.xfail(strict=True, reason=MVN_EPS_NOTE))],
)
def test_oracle_reproduces_real_caffe_layer_outputs(shared_reference: Path, tmp_path: Path, case: str) -> None:
    folder = shared_reference / "caffe_layers_opencv"
    spec = _case(shared_reference, case)
    caffemodel = folder / spec["caffemodel"] if spec["caffemodel"] else None
    feed = np.load(folder / spec["feeds"]["input"])
    out = produce_opencv_reference(folder / spec["prototxt"], caffemodel, {"input": feed}, tmp_path / "ref.h5")
    expected = np.load(folder / spec["outputs"][0])
    with read_activations(out) as ref:
        got = ref.get(spec["output_blob"])
        np.testing.assert_array_equal(ref.inputs["input"], feed)
    assert got.shape == expected.shape
    diff = np.abs(got.astype(np.float64) - expected)
    assert diff.mean() <= MEAN_ABS_TOL and diff.max() <= MAX_ABS_TOL, (diff.mean(), diff.max())


def test_in_place_write_to_an_input_is_the_blob_not_the_input(shared_reference: Path, tmp_path: Path) -> None:
    """layer_prelu's first PReLU writes blob "input" in place: /inputs keeps the feed, /blobs the final value."""
    folder = shared_reference / "caffe_layers_opencv"
    feed = np.load(folder / "blob.npy")
    out = produce_opencv_reference(folder / "layer_prelu.prototxt", folder / "layer_prelu.caffemodel",
                                   {"input": feed}, tmp_path / "ref.h5")
    with read_activations(out) as ref:
        np.testing.assert_array_equal(ref.inputs["input"], feed)
        after = ref.get("input")
    assert np.array_equal(after[feed > 0], feed[feed > 0]) and not np.array_equal(after, feed)


# A net with Caffe's in-place chains and an out-of-place ReLU whose input must keep its pre-ReLU value.
IN_PLACE_NET = """name: "in_place"
input: "data"
input_shape { dim: 1 dim: 2 dim: 6 dim: 6 }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param { num_output: 3 kernel_size: 3 pad: 1 bias_term: false } }
layer { name: "bn" type: "BatchNorm" bottom: "conv" top: "conv" batch_norm_param { use_global_stats: true } }
layer { name: "scale" type: "Scale" bottom: "conv" top: "conv" scale_param { bias_term: true } }
layer { name: "act" type: "ReLU" bottom: "conv" top: "act" }
layer { name: "sum" type: "Eltwise" bottom: "conv" bottom: "act" top: "sum" }
layer { name: "sum_relu" type: "ReLU" bottom: "sum" top: "sum" }
"""


def _in_place_files(tmp_path: Path) -> tuple[Path, Path, dict[str, np.ndarray]]:
    rng = np.random.default_rng(5)
    weights = {
        "conv": [rng.standard_normal((3, 2, 3, 3)).astype(np.float32)],
        "bn": [rng.standard_normal(3).astype(np.float32) * 4, rng.uniform(1, 3, 3).astype(np.float32) * 4,
               np.array([4.0], np.float32)],
        "scale": [rng.uniform(0.5, 1.5, 3).astype(np.float32), rng.standard_normal(3).astype(np.float32)],
    }
    prototxt = tmp_path / "in_place.prototxt"
    prototxt.write_text(IN_PLACE_NET)
    caffemodel = tmp_path / "in_place.caffemodel"
    write_caffemodel(caffemodel, parse_prototxt_text(IN_PLACE_NET), weights)
    return prototxt, caffemodel, weights


def test_in_place_blobs_are_recorded_after_their_last_writer(tmp_path: Path) -> None:
    prototxt, caffemodel, w = _in_place_files(tmp_path)
    data = np.random.default_rng(6).standard_normal((1, 2, 6, 6)).astype(np.float32)
    out = produce_opencv_reference(prototxt, caffemodel, {"data": data}, tmp_path / "ref.h5")
    conv = F.conv2d(torch.from_numpy(data).double(), torch.from_numpy(w["conv"][0]).double(), padding=1).numpy()
    mean, var = w["bn"][0] / 4.0, w["bn"][1] / 4.0
    per_channel = (slice(None), None, None)
    bn = (conv - mean[per_channel]) / np.sqrt(var[per_channel] + 1e-5)
    scaled = bn * w["scale"][0][per_channel] + w["scale"][1][per_channel]
    with read_activations(out) as ref:
        assert ref.names == ["conv", "act", "sum"]  # the unwritten input lives in /inputs only
        np.testing.assert_allclose(ref.get("conv"), scaled, atol=1e-5)  # after BatchNorm and Scale
        assert (ref.get("conv") < 0).any()  # the out-of-place ReLU did not clobber it
        np.testing.assert_allclose(ref.get("act"), np.maximum(scaled, 0), atol=1e-5)
        np.testing.assert_allclose(ref.get("sum"), np.maximum(scaled + np.maximum(scaled, 0), 0), atol=1e-5)


def test_blob_subset_keeps_forward_order(tmp_path: Path) -> None:
    prototxt, caffemodel, _ = _in_place_files(tmp_path)
    data = np.ones((1, 2, 6, 6), np.float32)
    out = produce_opencv_reference(prototxt, caffemodel, {"data": data}, tmp_path / "ref.h5", blobs=["sum", "conv"])
    with read_activations(out) as ref:
        assert ref.names == ["conv", "sum"]
        assert list(ref.inputs) == ["data"]


def test_unknown_blob_in_subset_is_named(tmp_path: Path) -> None:
    prototxt, caffemodel, _ = _in_place_files(tmp_path)
    with pytest.raises(CaffeError, match="no layer of the net produces 'res5c', 'data' .data: net input"):
        produce_opencv_reference(prototxt, caffemodel, {"data": np.ones((1, 2, 6, 6), np.float32)},
                                 tmp_path / "ref.h5", blobs=["conv", "res5c", "data"])
    assert not (tmp_path / "ref.h5").exists()


def test_inputs_must_match_the_declared_inputs(tmp_path: Path) -> None:
    prototxt, caffemodel, _ = _in_place_files(tmp_path)
    with pytest.raises(CaffeError, match="declared inputs"):
        produce_opencv_reference(prototxt, caffemodel, {"image": np.ones((1, 2, 6, 6), np.float32)},
                                 tmp_path / "ref.h5")


def test_oracle_runs_plain_cpu_fp32_without_fusion_or_winograd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fused conv+BN or Winograd change rounding below any numeric test's reach, so pin the settings."""
    import cv2

    calls: list[tuple[str, object]] = []
    real_read = cv2.dnn.readNetFromCaffe

    class Spy:
        def __init__(self, net) -> None:
            self._net = net

        def __getattr__(self, name):
            attr = getattr(self._net, name)
            if name in ("setPreferableBackend", "setPreferableTarget", "enableFusion", "enableWinograd"):
                return lambda value: (calls.append((name, value)), attr(value))[1]
            return attr

    monkeypatch.setattr(cv2.dnn, "readNetFromCaffe", lambda *args: Spy(real_read(*args)))
    prototxt, caffemodel, _ = _in_place_files(tmp_path)
    produce_opencv_reference(prototxt, caffemodel, {"data": np.ones((1, 2, 6, 6), np.float32)}, tmp_path / "ref.h5")
    assert sorted(calls) == sorted([
        ("setPreferableBackend", cv2.dnn.DNN_BACKEND_OPENCV), ("setPreferableTarget", cv2.dnn.DNN_TARGET_CPU),
        ("enableFusion", False), ("enableWinograd", False),
    ])


def test_opencv_5_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    import cv2

    monkeypatch.setattr(cv2, "__version__", "5.0.0")
    with pytest.raises(CaffeError, match="opencv-python-headless<5"):
        require_opencv4()


# A tiny multi-scale net shaped like DeepLab's: shrink/zoom Interps on the input and on a deep blob,
# three towers sharing weights, and Eltwise MAX fusion. 33 is odd, so every shrink rounds.
def _tower(sfx: str) -> str:
    bottom = "data" + sfx
    return f"""
layer {{ name: "conv1{sfx}" type: "Convolution" bottom: "{bottom}" top: "conv1{sfx}"
  convolution_param {{ num_output: 4 kernel_size: 3 stride: 2 pad: 1 bias_term: false }} }}
layer {{ name: "bn_conv1{sfx}" type: "BatchNorm" bottom: "conv1{sfx}" top: "conv1{sfx}" }}
layer {{ name: "scale_conv1{sfx}" type: "Scale" bottom: "conv1{sfx}" top: "conv1{sfx}"
  scale_param {{ bias_term: true }} }}
layer {{ name: "conv1_relu{sfx}" type: "ReLU" bottom: "conv1{sfx}" top: "conv1{sfx}" }}
layer {{ name: "pool1{sfx}" type: "Pooling" bottom: "conv1{sfx}" top: "pool1{sfx}"
  pooling_param {{ pool: MAX kernel_size: 3 stride: 2 pad: 1 }} }}
layer {{ name: "fc1{sfx}" type: "Convolution" bottom: "pool1{sfx}" top: "fc1{sfx}"
  convolution_param {{ num_output: 3 kernel_size: 3 pad: 1 }} }}
"""


MSC_NET = (
    'name: "tiny_msc"\ninput: "data"\ninput_shape { dim: 1 dim: 3 dim: 33 dim: 33 }\n'
    'layer { name: "data_res05" type: "Interp" bottom: "data" top: "data_res05"\n'
    "  interp_param { shrink_factor: 2 pad_beg: 0 pad_end: 0 } }\n"
    'layer { name: "data_res075" type: "Interp" bottom: "data" top: "data_res075"\n'
    "  interp_param { shrink_factor: 4 zoom_factor: 3 pad_beg: 0 pad_end: 0 } }\n"
    + "".join(_tower(sfx) for sfx in ("", "_res05", "_res075"))
    + 'layer { name: "fc1_res05_interp" type: "Interp" bottom: "fc1_res05" top: "fc1_res05_interp"\n'
    "  interp_param { zoom_factor: 2 } }\n"
    'layer { name: "fc1_res075_interp" type: "Interp" bottom: "fc1_res075" top: "fc1_res075_interp"\n'
    "  interp_param { zoom_factor: 4 shrink_factor: 3 } }\n"
    'layer { name: "fc_fusion" type: "Eltwise" bottom: "fc1" bottom: "fc1_res075_interp" bottom: "fc1_res05_interp"\n'
    "  top: \"fc_fusion\" eltwise_param { operation: MAX } }\n"
)


@pytest.fixture(scope="module")
def msc_files(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("msc")
    rng = np.random.default_rng(7)
    shared = {
        "conv1": [rng.standard_normal((4, 3, 3, 3)).astype(np.float32) * 0.05],
        "bn_conv1": [rng.standard_normal(4).astype(np.float32), rng.uniform(1, 2, 4).astype(np.float32),
                     np.array([1.0], np.float32)],
        "scale_conv1": [rng.uniform(0.5, 1.5, 4).astype(np.float32), rng.standard_normal(4).astype(np.float32)],
        "fc1": [rng.standard_normal((3, 4, 3, 3)).astype(np.float32), rng.standard_normal(3).astype(np.float32)],
    }
    weights = {name + sfx: blobs for name, blobs in shared.items() for sfx in ("", "_res05", "_res075")}
    prototxt = folder / "tiny_msc.prototxt"
    prototxt.write_text(MSC_NET)
    caffemodel = folder / "tiny_msc.caffemodel"
    write_caffemodel(caffemodel, parse_prototxt_text(MSC_NET), weights)
    return prototxt, caffemodel


@pytest.fixture(scope="module")
def msc_reference(msc_files, tmp_path_factory) -> Path:
    prototxt, caffemodel = msc_files
    data = caffe_preprocess(synthetic_image(33, 33))
    return produce_opencv_reference(prototxt, caffemodel, {"data": data},
                                    tmp_path_factory.mktemp("ref") / "ref.h5")


def test_shrink_interps_get_caffe_sizes(msc_reference: Path) -> None:
    with read_activations(msc_reference) as ref:
        assert ref.shape("data_res05")[2:] == caffe_interp_size(33, 33, shrink_factor=2) == (17, 17)
        assert ref.shape("data_res075")[2:] == caffe_interp_size(33, 33, shrink_factor=4, zoom_factor=3) == (25, 25)
        deep = ref.shape("fc1_res075")[2:]
        assert deep == (7, 7)
        assert ref.shape("fc1_res075_interp")[2:] == caffe_interp_size(*deep, shrink_factor=3, zoom_factor=4) == (9, 9)
        assert "Interp shrink_factor rewritten to explicit height/width" in ref.producer
        assert "fc1_res075_interp 9x9" in ref.producer
        assert ref.prototxt == MSC_NET  # the net that was meant, not the rewrite


def test_rewritten_interp_values_are_caffe_bilinear(msc_reference: Path) -> None:
    with read_activations(msc_reference) as ref:
        data = torch.from_numpy(ref.inputs["data"]).double()
        for name, size in (("data_res05", (17, 17)), ("data_res075", (25, 25))):
            expected = caffe_interp(data, *size).numpy()
            np.testing.assert_allclose(ref.get(name), expected, atol=1e-4)
        fc1 = torch.from_numpy(ref.get("fc1_res075")).double()
        np.testing.assert_allclose(ref.get("fc1_res075_interp"), caffe_interp(fc1, 9, 9).numpy(), atol=1e-5)


def test_fusion_is_the_max_of_the_towers(msc_reference: Path) -> None:
    with read_activations(msc_reference) as ref:
        towers = [ref.get(n) for n in ("fc1", "fc1_res075_interp", "fc1_res05_interp")]
        np.testing.assert_array_equal(ref.get("fc_fusion"), np.maximum(np.maximum(towers[0], towers[1]), towers[2]))
        assert not np.array_equal(towers[0], towers[1])  # the towers really differ


def test_order_is_first_production_order(msc_reference: Path) -> None:
    with read_activations(msc_reference) as ref:
        assert ref.names == [
            "data_res05", "data_res075",
            "conv1", "pool1", "fc1",
            "conv1_res05", "pool1_res05", "fc1_res05",
            "conv1_res075", "pool1_res075", "fc1_res075",
            "fc1_res05_interp", "fc1_res075_interp", "fc_fusion",
        ]
        assert (ref.get("conv1") >= 0).all()  # after the in-place ReLU


def test_interp_pads_are_refused(tmp_path: Path, msc_files) -> None:
    prototxt = tmp_path / "padded.prototxt"
    prototxt.write_text(MSC_NET.replace("shrink_factor: 2 pad_beg: 0 pad_end: 0", "shrink_factor: 2 pad_end: -1"))
    with pytest.raises(CaffeError, match="layer 'data_res05'.*crop"):
        produce_opencv_reference(prototxt, msc_files[1], {"data": np.zeros((1, 3, 33, 33), np.float32)},
                                 tmp_path / "ref.h5")


@pytest.fixture(scope="module")
def tiny_deeplab(tmp_path_factory):
    from converter.synthetic.weights import write_synthetic_deeplab
    from models.deeplab import ResNetConfig

    return write_synthetic_deeplab(tmp_path_factory.mktemp("deeplab"), "msc_test", ResNetConfig.tiny(),
                                   input_size=(33, 33))


def test_stage_subset_of_the_deeplab_net(tiny_deeplab) -> None:
    names = stage_blobs(read_prototxt(tiny_deeplab.prototxt))
    heads = [f"fc1_voc12{t}{c}" for t in ("", "_res05", "_res075") for c in ("_c0", "_c1", "_c2", "_c3", "")]
    assert names == [
        "data_res05", "data_res075", "conv1", "pool1", "res2b", "res3b1", "res4b1", "res5b", *heads,
        "fc1_voc12_res05_interp", "fc1_voc12_res075_interp", "fc_fusion", "fc1_interp",
    ]


def test_cli_writes_the_stage_subset_of_the_deeplab_net(tiny_deeplab, tmp_path: Path, capsys) -> None:
    out = tmp_path / "ref.h5"
    code = main(["--prototxt", str(tiny_deeplab.prototxt), "--caffemodel", str(tiny_deeplab.caffemodel),
                 "--out", str(out), "--size", "65", "65", "--blobs", "stages", "--compress"])
    assert code == 0 and "wrote" in capsys.readouterr().out
    with read_activations(out) as ref:
        assert ref.inputs["data"].shape == (1, 3, 65, 65)
        np.testing.assert_array_equal(ref.inputs["data"], caffe_preprocess(synthetic_image(65, 65)))
        assert ref.shape("data_res075") == (1, 3, *caffe_interp_size(65, 65, shrink_factor=4, zoom_factor=3))
        fused = np.maximum(np.maximum(ref.get("fc1_voc12"), ref.get("fc1_voc12_res075_interp")),
                           ref.get("fc1_voc12_res05_interp"))
        np.testing.assert_array_equal(ref.get("fc_fusion"), fused)
    with h5py.File(out, "r") as f:
        assert f["blobs/res5b"].compression == "gzip"


def test_cli_pads_a_real_picture_to_the_declared_size(tiny_deeplab, tmp_path: Path) -> None:
    import cv2

    picture = tmp_path / "picture.png"
    cv2.imwrite(str(picture), synthetic_image(20, 30, seed=1))
    out = tmp_path / "ref.h5"
    assert main(["--prototxt", str(tiny_deeplab.prototxt), "--caffemodel", str(tiny_deeplab.caffemodel),
                 "--out", str(out), "--image", str(picture), "--blobs", "fc_fusion"]) == 0
    with read_activations(out) as ref:
        data = ref.inputs["data"]
        assert data.shape == (1, 3, 33, 33)  # padded up to the declared 33x33 ...
        assert not data[:, :, 20:, :].any() and not data[:, :, :, 30:].any()  # ... with the mean
        assert ref.names == ["fc_fusion"]


def test_cli_reports_bad_input_in_one_line(tmp_path: Path, capsys) -> None:
    code = main(["--prototxt", str(tmp_path / "absent.prototxt"), "--out", str(tmp_path / "ref.h5")])
    err = capsys.readouterr().err
    assert code != 0 and err.startswith("error: ") and err.count("\n") == 1
