"""The evaluator's fast path: folding BatchNorm+Scale into the convolutions changes nothing beyond rounding."""

from __future__ import annotations

import torch

from models.caffe_layers import FrozenBatchNormScale
from models.deeplab import DeepLabV2MSC, ResNetConfig, predict_scores
from segmentation.fast import fold_batchnorm_into_convs


def _randomised(model: torch.nn.Module) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, FrozenBatchNormScale):
            n = module.num_features
            module.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
            module.bias.copy_(torch.randn(n, generator=generator) * 0.1)
    return model.eval()


def test_folded_batchnorm_matches_the_caffe_order_within_rounding() -> None:
    torch.manual_seed(0)
    model = _randomised(DeepLabV2MSC(num_classes=5, config=ResNetConfig.tiny()))
    image = torch.randn(1, 3, 65, 65) * 50
    expected = predict_scores(model, image)
    count = fold_batchnorm_into_convs(model)
    # stem + per block three convs + each stage's projection: 1 + 8 * 3 + 4
    assert count == 1 + 8 * 3 + 4
    assert not any(isinstance(m, FrozenBatchNormScale) for m in model.modules())
    got = predict_scores(model, image)
    scale = expected.abs().max()
    assert (got - expected).abs().max() <= 1e-4 * scale
    assert (got.argmax(1) == expected.argmax(1)).float().mean() > 0.999
