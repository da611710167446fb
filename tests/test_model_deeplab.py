"""DeepLabV2 / DeepLabV2MSC: key layout, frozen BN, blob taps, size policy, inference helper."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from models.alignment import aligned_size, is_aligned, prediction_input_size, score_size
from models.caffe_layers import FrozenBatchNormScale
from converter.deeplab.names import caffe_blob_taps, caffe_blocks, caffe_msc_blob_taps
from models.deeplab import DeepLabV2, DeepLabV2MSC, MSCOutputs, ResNetConfig, predict_labels, predict_scores
from models.interp import caffe_interp

TINY = ResNetConfig.tiny()


def _randomized(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """`model` with random BN statistics/affine (defaults are the identity, which hides mistakes)."""
    generator = torch.Generator().manual_seed(seed)
    for name, buffer in model.named_buffers():
        if name.endswith(("running_var", "weight")):
            buffer.copy_(torch.rand(buffer.shape, generator=generator) + 0.5)
        else:
            buffer.copy_(torch.randn(buffer.shape, generator=generator) * 0.1)
    return model.eval()


def _image(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _prototxt_tops(path) -> list[str]:
    return list(dict.fromkeys(re.findall(r'^\s*top:\s*"([^"]+)"', path.read_text(), flags=re.M)))


def test_state_dict_keys_follow_the_documented_layout():
    norm = ("weight", "bias", "running_mean", "running_var")
    expected = {"backbone.conv1.weight"} | {f"backbone.bn1.{n}" for n in norm}
    for layer, count in enumerate(TINY.blocks, start=1):
        for i in range(count):
            prefix = f"backbone.layer{layer}.{i}"
            expected |= {f"{prefix}.conv{k}.weight" for k in (1, 2, 3)}
            expected |= {f"{prefix}.bn{k}.{n}" for k in (1, 2, 3) for n in norm}
        expected |= {f"backbone.layer{layer}.0.downsample.0.weight"}
        expected |= {f"backbone.layer{layer}.0.downsample.1.{n}" for n in norm}
    expected |= {f"aspp.branches.{k}.{n}" for k in range(4) for n in ("weight", "bias")}
    assert set(DeepLabV2(21, TINY).state_dict()) == expected
    assert set(DeepLabV2MSC(21, TINY).state_dict()) == expected


def test_msc_shares_one_net_and_loads_single_scale_checkpoints():
    single = _randomized(DeepLabV2(7, TINY), seed=1)
    msc = DeepLabV2MSC(7, TINY)
    msc.load_state_dict(single.state_dict())
    assert msc.net.backbone is msc.backbone and msc.net.aspp is msc.aspp
    x = _image(1, 3, 33, 33)
    with torch.no_grad():
        assert torch.equal(msc.eval()(x).full, single(x))
        assert torch.equal(msc.net(x), single(x))
    DeepLabV2(7, TINY).load_state_dict(msc.state_dict())  # and back


def test_frozen_bn_stays_frozen_in_train_mode():
    model = _randomized(DeepLabV2MSC(5, TINY))
    before = {k: v.clone() for k, v in model.state_dict().items() if "bn" in k or "downsample.1" in k}
    x = _image(2, 3, 33, 33)
    with torch.no_grad():
        eval_out = model(x).fused
    model.train()
    train_out = model(x).fused
    train_out.sum().backward()
    for module in model.modules():
        if isinstance(module, FrozenBatchNormScale):
            assert not list(module.parameters())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert torch.equal(train_out.detach(), eval_out)
    assert model.backbone.conv1.weight.grad is not None


def test_frozen_bn_computes_in_caffe_order_bit_exact():
    generator = torch.Generator().manual_seed(0)
    bn = FrozenBatchNormScale(16, eps=1e-5)
    for buffer in bn.buffers():
        buffer.copy_(torch.randn(16, generator=generator))
    bn.running_var.abs_().mul_(1e-4)  # near eps, where rounding order and eps show
    x = torch.randn(2, 16, 5, 7, generator=generator)
    view = (1, -1, 1, 1)
    mean, var = bn.running_mean.numpy().reshape(view), bn.running_var.numpy().reshape(view)
    gamma, beta = bn.weight.numpy().reshape(view), bn.bias.numpy().reshape(view)
    std = np.sqrt(var + np.float32(1e-5))
    expected = (x.numpy() - mean) / std * gamma + beta  # BatchNorm, then Scale, all float32
    assert np.array_equal(bn(x).numpy(), expected)
    assert bn(x.double()).dtype == torch.float64


def test_bn_eps_reaches_every_norm_and_matters_near_eps():
    model = DeepLabV2(3, TINY, bn_eps=1e-3)
    norms = [m for m in model.modules() if isinstance(m, FrozenBatchNormScale)]
    assert len(norms) == 1 + 3 * sum(TINY.blocks) + 4 and {m.eps for m in norms} == {1e-3}
    x = torch.randn(1, 4, 3, 3)
    small, large = FrozenBatchNormScale(4, eps=1e-5), FrozenBatchNormScale(4, eps=1e-3)
    for bn in (small, large):
        bn.running_var.fill_(1e-5)
    assert not torch.allclose(small(x), large(x), rtol=0.1)


def test_caffe_block_names_follow_the_release():
    names = [block for _, block in caffe_blocks(ResNetConfig.resnet101())]
    assert names[:8] == ["2a", "2b", "2c", "3a", "3b1", "3b2", "3b3", "4a"]
    assert names[-5:] == ["4b21", "4b22", "5a", "5b", "5c"]
    assert [block for _, block in caffe_blocks(TINY)] == ["2a", "2b", "3a", "3b1", "4a", "4b1", "5a", "5b"]
    assert caffe_blocks(TINY)[3][0] == "backbone.layer2.1"


def test_blob_taps_name_every_blob_of_the_caffe_single_scale_net(shared_reference):
    tops = _prototxt_tops(shared_reference / "deeplab_v2" / "voc12_resnet101_scale1_test_seed.prototxt")
    config = ResNetConfig.resnet101()
    taps = caffe_blob_taps(config)
    assert list(taps) == [top for top in tops if top not in ("data", "label", "fc1_interp", "fc1_accuracy")]
    with torch.device("meta"):
        model = DeepLabV2(21, config)
    for path in taps.values():
        model.get_submodule(path)


def test_msc_blob_taps_name_every_blob_of_the_caffe_msc_net(shared_reference):
    tops = _prototxt_tops(shared_reference / "deeplab_v2" / "voc12_resnet101_msc_test_seed_513.prototxt")
    config = ResNetConfig.resnet101()
    taps = caffe_msc_blob_taps(config)
    assert set(taps) == set(tops) - {"data", "label", "fc1_interp", "fc1_accuracy"}
    with torch.device("meta"):
        model = DeepLabV2MSC(21, config)
    for path, call in taps.values():
        model.get_submodule(path)
        assert call in (0, 1, 2)


def test_blob_taps_hold_the_caffe_values():
    model = _randomized(DeepLabV2(6, TINY), seed=2)
    taps = caffe_blob_taps(TINY)
    values: dict[str, torch.Tensor] = {}
    handles = [
        model.get_submodule(path).register_forward_hook(
            lambda module, args, out, blob=blob: values.__setitem__(blob, out)
        )
        for blob, path in taps.items()
    ]
    with torch.no_grad():
        out = model(_image(1, 3, 41, 35))
    for handle in handles:
        handle.remove()
    assert values["conv1"].min() >= 0 and values["res2a_branch2a"].min() >= 0 and values["res2a_branch2b"].min() >= 0
    assert values["res2a_branch2c"].min() < 0  # BN+Scale output, before the block's ReLU
    assert torch.equal(values["pool1"], model.backbone.maxpool(values["conv1"]))
    assert torch.equal(values["res2a"], torch.relu(values["res2a_branch1"] + values["res2a_branch2c"]))
    assert torch.equal(values["res2b"], torch.relu(values["res2a"] + values["res2b_branch2c"]))
    assert torch.equal(values["res3b1"], torch.relu(values["res3a"] + values["res3b1_branch2c"]))
    head = values["fc1_voc12_c0"] + values["fc1_voc12_c1"] + values["fc1_voc12_c2"] + values["fc1_voc12_c3"]
    assert torch.equal(values["fc1_voc12"], head) and torch.equal(out, head)


def test_msc_runs_towers_full_res075_res05_in_order():
    model = DeepLabV2MSC(3, TINY).eval()
    sizes = []
    handle = model.aspp.register_forward_hook(lambda module, args, out: sizes.append(out.shape[-1]))
    with torch.no_grad():
        model(torch.zeros(1, 3, 65, 65))
    handle.remove()
    assert sizes == [9, 7, 5]  # 65 -> 9; data_res075 49 -> 7; data_res05 33 -> 5


def test_aligned_sizes_are_caffe_sizes_that_fuse():
    assert [n for n in range(1, 70) if is_aligned(n)] == [1, 2, 3, 4, 5, 6, 33, 34, 35, 36, 37, 38, 65, 66, 67, 68, 69]
    assert (aligned_size(321), aligned_size(513), aligned_size(500), aligned_size(375)) == (321, 513, 513, 385)
    assert (prediction_input_size(322), prediction_input_size(321), prediction_input_size(500)) == (353, 321, 513)


def test_msc_pads_non_aligned_inputs_and_crops_back():
    model = _randomized(DeepLabV2MSC(4, TINY), seed=3)
    x = _image(2, 3, 500, 375, seed=1)
    with torch.no_grad():
        out = model(x)
        padded = torch.zeros(2, 3, 513, 385)
        padded[..., :500, :375] = x
        reference = model(padded)
        single = model(x[1:])
    assert out.full.shape == out.scale075.shape == out.fused.shape == (2, 4, score_size(500), score_size(375))
    assert (score_size(500), score_size(375)) == (63, 48)
    assert out.scale05.shape == (2, 4, score_size(250), score_size(188)) == (2, 4, 32, 24)
    for cropped, whole in zip(out, reference):
        assert torch.equal(cropped, whole[..., : cropped.shape[-2], : cropped.shape[-1]])
    for batched, alone in zip(out, single):
        torch.testing.assert_close(batched[1:], alone, rtol=1e-5, atol=1e-5)


def test_msc_strict_alignment_fails_like_caffe_naming_the_sizes():
    model = DeepLabV2MSC(3, TINY, align="strict").eval()
    with pytest.raises(ValueError, match=r"500x375.*63x48.*61x45.*63x47.*513x385"):
        model(torch.zeros(1, 3, 500, 375))
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 33, 65)).fused.shape[-2:] == (5, 9)
    with pytest.raises(ValueError, match="align"):
        DeepLabV2MSC(3, TINY, align="crop")


def test_predict_scores_zooms_by_8_and_crops_like_the_test_net():
    model = _randomized(DeepLabV2MSC(4, TINY), seed=4)
    aligned = _image(1, 3, 65, 97, seed=2)
    with torch.no_grad():
        fused = model(aligned).fused
    assert torch.equal(predict_scores(model, aligned), caffe_interp(fused, 65, 97))  # 9 -> 65, 13 -> 97: no crop
    x = _image(2, 3, 50, 37, seed=3)
    padded = torch.zeros(2, 3, 65, 65)
    padded[..., :50, :37] = x
    with torch.no_grad():
        expected = caffe_interp(model(padded).fused, 65, 65)[..., :50, :37]
    scores = predict_scores(model, x)
    assert scores.shape == (2, 4, 50, 37) and torch.equal(scores, expected)
    labels = predict_labels(model, x)
    assert labels.shape == (2, 50, 37) and labels.dtype == torch.int64
    assert torch.equal(labels, scores.argmax(dim=1))


def test_predict_scores_pads_to_a_fixed_size_like_the_release_evaluation():
    model = _randomized(DeepLabV2MSC(4, TINY), seed=4)
    x = _image(1, 3, 50, 37, seed=3)
    padded = torch.zeros(1, 3, 97, 97)  # the evaluation pads every image to one size (513 for VOC)
    padded[..., :50, :37] = x
    with torch.no_grad():
        expected = caffe_interp(model(padded).fused, 97, 97)[..., :50, :37]
    assert torch.equal(predict_scores(model, x, pad_to=(97, 97)), expected)
    assert not torch.equal(predict_scores(model, x), expected)  # 65x65 padding feeds the towers other sizes
    with pytest.raises(ValueError, match="smaller than the image"):
        predict_scores(model, x, pad_to=(33, 33))


def test_predict_scores_works_with_the_single_scale_net():
    model = _randomized(DeepLabV2(4, TINY), seed=5)
    x = _image(1, 3, 10, 12, seed=4)
    scores = predict_scores(model, x)  # 10 pads to 33: zoom of a 2-pixel map would cover only 9
    assert scores.shape == (1, 4, 10, 12) and torch.isfinite(scores).all()


def test_channels_last_and_float64_give_the_same_scores():
    model = _randomized(DeepLabV2MSC(4, TINY), seed=6)
    x = _image(1, 3, 65, 33, seed=5)
    with torch.no_grad():
        reference = model(x).fused
        channels_last = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last)).fused
        double = model.double()(x.double()).fused
    torch.testing.assert_close(channels_last, reference, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(double.float(), reference, rtol=1e-4, atol=1e-5)


def test_resnet101_parameter_count():
    with torch.device("meta"):
        model = DeepLabV2(21, ResNetConfig.resnet101())
    backbone_convs = sum(p.numel() for p in model.backbone.parameters())
    bn_affine = sum(b.numel() for n, b in model.named_buffers() if n.endswith(("weight", "bias")))
    assert backbone_convs == 42_394_816
    assert backbone_convs + bn_affine == 42_500_160  # torchvision's resnet101 without its fc
    assert sum(p.numel() for p in model.aspp.parameters()) == 4 * (2048 * 9 * 21 + 21)


@pytest.mark.slow
def test_resnet101_msc_forward_at_321():
    model = DeepLabV2MSC(21, ResNetConfig.resnet101()).eval()
    with torch.no_grad():
        out = model(_image(1, 3, 321, 321))
    assert isinstance(out, MSCOutputs)
    assert out.fused.shape == out.full.shape == out.scale075.shape == (1, 21, 41, 41)
    assert out.scale05.shape == (1, 21, 21, 21)
    assert all(torch.isfinite(t).all() for t in out)
