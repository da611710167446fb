"""Layers as training sees them: Eltwise MAX's Caffe backward (first maximal input), frozen and folded BatchNorm."""

from __future__ import annotations

import numpy as np
import torch

from models.caffe_layers import EltwiseMax, FrozenBatchNormScale
from models.deeplab import DeepLabV2MSC, ResNetConfig
from segmentation.train_speed import FoldedBatchNormScale, fold_frozen_batchnorm


def _caffe_eltwise_max_backward(inputs: list[np.ndarray], grad: np.ndarray) -> list[np.ndarray]:
    """eltwise_layer.cpp: mask = 0; for k >= 1 if bottom[k] > top: top = bottom[k], mask = k; diff_k = grad where mask == k."""
    top, mask = inputs[0].copy(), np.zeros(grad.shape, dtype=int)
    for k, bottom in enumerate(inputs[1:], start=1):
        greater = bottom > top
        top[greater], mask[greater] = bottom[greater], k
    return [np.where(mask == k, grad, 0) for k in range(len(inputs))]


def test_eltwise_max_backward_gives_the_whole_gradient_to_the_first_maximal_input() -> None:
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 3, (2, 4, 5, 5)).astype(np.float32) for _ in range(3)]  # many ties
    grad = rng.normal(size=(2, 4, 5, 5)).astype(np.float32)
    inputs = [torch.tensor(a, requires_grad=True) for a in arrays]
    out = EltwiseMax()(*inputs)
    out.backward(torch.from_numpy(grad))
    np.testing.assert_array_equal(out.detach().numpy(), np.maximum(np.maximum(arrays[0], arrays[1]), arrays[2]))
    for got, expected in zip(inputs, _caffe_eltwise_max_backward(arrays, grad)):
        np.testing.assert_array_equal(got.grad.numpy(), expected)


def test_torch_maximum_would_split_ties_which_caffe_does_not() -> None:
    a, b = torch.ones(3, requires_grad=True), torch.ones(3, requires_grad=True)
    torch.maximum(a, b).sum().backward()
    assert a.grad.tolist() == [0.5, 0.5, 0.5]
    a.grad = b.grad = None
    EltwiseMax()(a, b).sum().backward()
    assert a.grad.tolist() == [1.0, 1.0, 1.0] and b.grad.tolist() == [0.0, 0.0, 0.0]


def test_the_models_fusion_uses_caffes_backward_in_training() -> None:
    model = DeepLabV2MSC(num_classes=3, config=ResNetConfig.tiny())
    fused = model(torch.randn(1, 3, 33, 33)).fused
    assert "EltwiseMaxFirst" in type(fused.grad_fn).__name__
    with torch.no_grad():
        assert model(torch.randn(1, 3, 33, 33)).fused.grad_fn is None


def test_batchnorm_is_frozen_no_parameters_and_train_mode_changes_nothing() -> None:
    model = DeepLabV2MSC(num_classes=3, config=ResNetConfig.tiny())
    norms = [m for m in model.modules() if isinstance(m, FrozenBatchNormScale)]
    assert norms and all(not list(m.parameters()) for m in norms)
    x = torch.randn(1, 3, 33, 33)
    torch.testing.assert_close(model.train()(x).fused, model.eval()(x).fused, rtol=0, atol=0)


def test_folded_batchnorm_keeps_the_state_dict_and_matches_within_rounding() -> None:
    torch.manual_seed(0)
    model = DeepLabV2MSC(num_classes=3, config=ResNetConfig.tiny()).eval()
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, FrozenBatchNormScale):
            module.running_mean.copy_(torch.randn(module.num_features, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
            module.weight.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
    x = torch.randn(1, 3, 33, 33) * 50
    keys = list(model.state_dict())
    expected = model(x).fused
    assert fold_frozen_batchnorm(model) == 1 + 8 * 3 + 4
    assert list(model.state_dict()) == keys
    assert all(type(m) is not FrozenBatchNormScale for m in model.modules())
    assert any(isinstance(m, FoldedBatchNormScale) for m in model.modules())
    got = model(x).fused
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()
