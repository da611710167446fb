"""SoftmaxWithLoss (VALID, ignore 255) and the label shrink, against Caffe's formulas written in numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from converter.errors import CaffeError
from models.deeplab import MSCOutputs
from models.interp import caffe_interp
from segmentation.losses import deeplab_losses, shrink_label, softmax_loss_valid

FLT_MIN = np.finfo(np.float32).tiny


def _case(n: int = 2, classes: int = 5, size: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randn(n, classes, size, size, generator=generator) * 3
    label = torch.randint(0, classes, (n, size, size), generator=generator)
    label[0, :2] = 255
    label[1, :, :4] = 255  # different valid counts per image
    return scores, label


def _caffe_numpy(scores: np.ndarray, label: np.ndarray, ignore: int = 255) -> tuple[float, np.ndarray]:
    """softmax_loss_layer.cpp per image (VALID): sum -log(max(p, FLT_MIN)) / count; diff (p - 1[y]) / count."""
    losses, grads = [], np.zeros_like(scores)
    for n in range(scores.shape[0]):
        shifted = scores[n] - scores[n].max(0, keepdims=True)
        prob = np.exp(shifted) / np.exp(shifted).sum(0, keepdims=True)
        valid = label[n] != ignore
        count = max(int(valid.sum()), 1)
        total = 0.0
        for y, x in zip(*np.nonzero(valid)):
            total -= np.log(max(prob[label[n, y, x], y, x], FLT_MIN))
            grads[n, :, y, x] = prob[:, y, x]
            grads[n, label[n, y, x], y, x] -= 1
        losses.append(total / count)
        grads[n] /= count
    return float(np.mean(losses)), grads / scores.shape[0]


def test_valid_normalisation_per_image_matches_caffes_formula() -> None:
    scores, label = _case()
    scores.requires_grad_(True)
    loss = softmax_loss_valid(scores, label)
    loss.backward()
    expected_loss, expected_grad = _caffe_numpy(scores.detach().double().numpy(), label.numpy())
    assert loss.item() == pytest.approx(expected_loss, rel=1e-5)
    np.testing.assert_allclose(scores.grad.numpy(), expected_grad, atol=1e-6)


def test_a_batch_gives_the_gradient_of_single_image_forwards_averaged() -> None:
    scores, label = _case()
    batch = scores.clone().requires_grad_(True)
    softmax_loss_valid(batch, label).backward()
    singles = []
    for n in range(2):
        one = scores[n : n + 1].clone().requires_grad_(True)
        softmax_loss_valid(one, label[n : n + 1]).backward()
        singles.append(one.grad)
    torch.testing.assert_close(batch.grad, torch.cat(singles) / 2)


def test_an_image_with_every_pixel_ignored_counts_one_and_adds_nothing() -> None:
    scores = torch.randn(1, 3, 4, 4, requires_grad=True)
    loss = softmax_loss_valid(scores, torch.full((1, 4, 4), 255))
    loss.backward()
    assert loss.item() == 0 and scores.grad.abs().max() == 0


def test_the_flt_min_floor_clips_the_value_but_not_caffes_gradient() -> None:
    scores = torch.tensor([[[[0.0]], [[200.0]]]], requires_grad=True)  # p(class 0) = e^-200 < FLT_MIN
    loss = softmax_loss_valid(scores, torch.zeros(1, 1, 1, dtype=torch.long))
    loss.backward()
    assert loss.item() == pytest.approx(-np.log(FLT_MIN), rel=1e-6)
    torch.testing.assert_close(scores.grad.flatten(), torch.tensor([-1.0, 1.0]))


def test_label_shrink_equals_caffes_interp_at_crops_32k_plus_1() -> None:
    label = torch.randint(0, 21, (1, 1, 65, 65)).float()
    for factor in (8, 16):
        size = (65 - 1) // factor + 1
        interp = caffe_interp(label, size, size)  # Interp shrink_factor: bilinear, aligned corners
        torch.testing.assert_close(shrink_label(label, factor), interp, rtol=0, atol=0)


def test_label_shrink_refuses_sizes_where_caffe_would_blend_labels() -> None:
    with pytest.raises(CaffeError, match="blend"):
        shrink_label(torch.zeros(1, 64, 64), 8)


def test_four_terms_pair_the_outputs_with_the_release_labels() -> None:
    generator = torch.Generator().manual_seed(0)
    full, scale075, fused = (torch.randn(1, 4, 5, 5, generator=generator) for _ in range(3))
    scale05 = torch.randn(1, 4, 3, 3, generator=generator)
    label = torch.randint(0, 4, (1, 33, 33), generator=generator)
    losses = deeplab_losses(MSCOutputs(full, scale075, scale05, fused), label)
    assert losses.loss == softmax_loss_valid(fused, label[:, ::8, ::8])
    assert losses.loss_res1 == softmax_loss_valid(full, label[:, ::8, ::8])
    assert losses.loss_res075 == softmax_loss_valid(scale075, label[:, ::8, ::8])
    assert losses.loss_res05 == softmax_loss_valid(scale05, label[:, ::16, ::16])
    assert losses.total() == losses.loss + losses.loss_res1 + losses.loss_res075 + losses.loss_res05
