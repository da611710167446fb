"""Synthetic DeepLab-v2 caffemodels: real Caffe format, calibrated scale, eps-sensitive, byte-reproducible."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from converter.deeplab.names import name_map
from converter.synthetic.netspec import deeplab_net_param
from converter.caffe.caffemodel import read_caffemodel
from converter.caffe.load import load_net
from converter.caffe.schema import caffe_pb
from converter.synthetic.weights import CALIBRATION_SIZE, NEAR_EPS_LAYERS, calibration_image, main, write_synthetic_deeplab
from converter.deeplab.names import caffe_blob_taps
from models.deeplab import DeepLabV2, ResNetConfig

TINY = ResNetConfig.tiny()
# sha256 of the tiny msc_test caffemodel from seed 0 (regenerate and update only on a deliberate change).
TINY_MSC_SHA256 = "2449277bbcabbdf94878b0d8f93ea174faca26d6abf1ada128b615b967e695d4"
# sha256 of the full-size (ResNet-101) msc_test caffemodel from seed 0, also checked on the GPU machine.
RESNET101_MSC_SHA256 = "5a0f9c67fff616ce5609430215b8e4c49c5f9364bde85fa70e526ee4e30d58ae"


@pytest.fixture(scope="module")
def tiny_msc(tmp_path_factory):
    return write_synthetic_deeplab(tmp_path_factory.mktemp("msc"), "msc_test", TINY, seed=0)


@pytest.fixture(scope="module")
def tiny_msc_net(tiny_msc):
    return read_caffemodel(tiny_msc.caffemodel)


def _state_dict(net, config, head_name="fc1_voc12"):
    """A minimal manual load (the real converter is tested elsewhere): statistics divided by the factor."""
    state = {}
    for row in name_map(config, head_name):
        if row.key is None:
            continue
        blobs = net.layer(row.layer).blobs
        value = blobs[row.index]
        if row.kind in ("bn_mean", "bn_var"):
            value = value / blobs[2][0]
        state[row.key] = torch.from_numpy(np.array(value, np.float32))
    return state


def _model(net, config, bn_eps=1e-5):
    model = DeepLabV2(num_classes=21, config=config, bn_eps=bn_eps).eval()
    model.load_state_dict(_state_dict(net, config))
    return model


def test_caffemodel_parses_and_every_parameter_layer_has_caffe_shaped_blobs(tiny_msc_net):
    net = tiny_msc_net
    widths = {"data": 3}
    for layer in net.layers:
        if layer.type == "Convolution":
            cp = layer.param.convolution_param
            k = cp.kernel_size[0]
            shapes = [(cp.num_output, widths[layer.bottoms[0]], k, k)]
            if layer.name.startswith("fc1_voc12"):
                shapes.append((cp.num_output,))
            widths[layer.tops[0]] = cp.num_output
        else:
            for top in layer.tops:
                widths[top] = widths[layer.bottoms[0]]
            channels = widths[layer.bottoms[0]]
            shapes = {"BatchNorm": [(channels,), (channels,), (1,)], "Scale": [(channels,), (channels,)]}.get(
                layer.type, []
            )
        assert [blob.shape for blob in layer.blobs] == shapes, layer.name
        assert all(blob.dtype == np.float32 for blob in layer.blobs)


def test_caffemodel_carries_the_full_layer_definitions(tiny_msc, tiny_msc_net):
    expected = deeplab_net_param("msc_test", TINY)
    assert [layer.name for layer in tiny_msc_net.layers] == [layer.name for layer in expected.layer]
    for saved, defined in zip(tiny_msc_net.layers, expected.layer):
        assert saved.param.phase == caffe_pb().TEST  # as Caffe's Net::ToProto saves a test net
        param = type(saved.param)()
        param.CopyFrom(saved.param)
        param.ClearField("phase")
        assert param == defined, saved.name
    assert dict(tiny_msc_net.inputs) == {"data": (1, 3, 321, 321)}
    from_prototxt = load_net(weights=tiny_msc.caffemodel, prototxt=tiny_msc.prototxt)
    assert [layer.name for layer in from_prototxt.layers] == [layer.name for layer in tiny_msc_net.layers]


def test_batchnorm_factors_differ_from_one_in_every_layer(tiny_msc_net):
    factors = [layer.blobs[2][0] for layer in tiny_msc_net.layers if layer.type == "BatchNorm"]
    assert factors and all(f > 0 and f != 1.0 for f in factors)
    assert max(factors) / min(factors) > 10


def test_some_channels_have_variance_near_eps(tiny_msc_net):
    for name in NEAR_EPS_LAYERS:
        mean, var, factor = tiny_msc_net.layer(name).blobs
        var = var / factor[0]
        assert np.any((var > 1e-7) & (var < 1e-4)), name
        assert np.median(var) > 1e-3, name


def test_towers_store_identical_copies_of_the_shared_weights(tiny_msc_net):
    for base in ("conv1", "bn_conv1", "scale3b1_branch2c", "res5b_branch2b"):
        for suffix in ("_res05", "_res075"):
            copies = tiny_msc_net.layer(base + suffix).blobs
            assert len(copies) > 0
            for ours, theirs in zip(tiny_msc_net.layer(base).blobs, copies):
                assert np.array_equal(ours, theirs)
    for i in range(4):
        for suffix in ("_res05", "_res075"):
            copies = tiny_msc_net.layer(f"fc1_voc12{suffix}_c{i}").blobs
            assert all(np.array_equal(a, b) for a, b in zip(tiny_msc_net.layer(f"fc1_voc12_c{i}").blobs, copies))


def _assert_realistic_scale(net, config, last_block):
    """std of the last block's output and of the fc1 scores on the calibration image within [0.1, 100]."""
    model = _model(net, config)
    captured = {}
    module = model.get_submodule(caffe_blob_taps(config)[last_block])
    module.register_forward_hook(lambda _m, _i, out: captured.setdefault(last_block, out))
    with torch.no_grad():
        scores = model(torch.from_numpy(calibration_image(*CALIBRATION_SIZE)))
    for name, value in ((last_block, captured[last_block]), ("fc1_voc12", scores)):
        assert torch.isfinite(value).all(), name
        assert 0.1 <= float(value.std()) <= 100.0, (name, float(value.std()))


def test_activations_keep_a_realistic_scale_at_res5_and_the_head(tiny_msc_net):
    _assert_realistic_scale(tiny_msc_net, TINY, "res5b")


def test_a_wrong_eps_changes_the_scores_visibly(tiny_msc_net):
    image = torch.from_numpy(calibration_image(*CALIBRATION_SIZE))
    with torch.no_grad():
        right = _model(tiny_msc_net, TINY, bn_eps=1e-5)(image)
        wrong = _model(tiny_msc_net, TINY, bn_eps=1e-3)(image)
    relative = float((right - wrong).abs().max() / right.abs().max())
    assert relative > 1e-2


def test_same_seed_gives_the_same_bytes_whatever_the_torch_thread_count(tmp_path, tiny_msc):
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1 if threads > 1 else 2)
        again = write_synthetic_deeplab(tmp_path, "msc_test", TINY, seed=0)
    finally:
        torch.set_num_threads(threads)
    assert again.sha256 == tiny_msc.sha256
    assert again.caffemodel.read_bytes() == tiny_msc.caffemodel.read_bytes()


def test_another_seed_gives_different_weights(tmp_path, tiny_msc):
    assert write_synthetic_deeplab(tmp_path, "msc_test", TINY, seed=1).sha256 != tiny_msc.sha256


def test_tiny_msc_caffemodel_sha256_is_pinned(tiny_msc):
    assert tiny_msc.sha256 == TINY_MSC_SHA256


def test_init_kind_writes_a_coco_head_with_91_classes(tmp_path):
    files = write_synthetic_deeplab(tmp_path, "init", TINY, seed=0)
    net = read_caffemodel(files.caffemodel)
    assert files.caffemodel.name == "init.caffemodel"
    assert net.layer("fc1_coco_c0").blobs[0].shape == (91, 128, 3, 3)
    assert not net.has_layer("fc1_voc12_c0")


def test_calibration_image_is_mean_subtracted_and_deterministic():
    image = calibration_image(65, 97, seed=3)
    assert image.shape == (1, 3, 65, 97) and image.dtype == np.float32
    assert np.array_equal(image, calibration_image(65, 97, seed=3))
    assert -130 < image.min() < -20 and 20 < image.max() < 155
    assert image.std() > 30


def test_cli_prints_written_paths_and_sha256(tmp_path, capsys):
    assert main(["--kind", "single_scale", "--config", "tiny", "--out", str(tmp_path), "--classes", "5",
                 "--size", "161", "193"]) == 0
    out = capsys.readouterr().out
    caffemodel = tmp_path / "scale1.caffemodel"
    assert f"caffemodel: {caffemodel}" in out and f"prototxt: {tmp_path / 'test_scale1.prototxt'}" in out
    net = read_caffemodel(caffemodel)
    assert net.layer("fc1_voc12_c3").blobs[1].shape == (5,)
    assert dict(net.inputs) == {"data": (1, 3, 161, 193)}
    assert main(["--kind", "single_scale", "--config", "tiny", "--out", str(tmp_path), "--classes", "5",
                 "--size", "161", "193", "--sha256-only"]) == 0
    assert capsys.readouterr().out.strip() in out


@pytest.mark.slow
def test_full_size_msc_caffemodel_is_written_fast_reproducibly_and_calibrated(tmp_path):
    started = time.perf_counter()
    files = write_synthetic_deeplab(tmp_path, "msc_test", ResNetConfig.resnet101(), seed=0)
    elapsed = time.perf_counter() - started
    assert 500e6 < files.caffemodel.stat().st_size < 560e6  # three tower copies of ~177 MB
    assert elapsed < 60, elapsed
    assert files.sha256 == RESNET101_MSC_SHA256
    _assert_realistic_scale(read_caffemodel(files.caffemodel), ResNetConfig.resnet101(), "res5c")
