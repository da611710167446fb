"""The metric convention, pinned against confusion matrices computed by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from segmentation.metrics import ConfusionMatrix


def test_ignored_pixels_are_not_counted() -> None:
    matrix = ConfusionMatrix(3)
    matrix.update(np.array([[0, 1, 255], [2, 255, 1]]), np.array([[0, 1, 2], [2, 0, 0]]))
    # rows gt, cols prediction: (0,0) (1,1) (2,2) (1,0); the two 255 pixels are dropped whatever was predicted
    assert matrix.matrix.tolist() == [[1, 0, 0], [1, 1, 0], [0, 0, 1]]
    scores = matrix.compute()
    assert scores.pixels == 4 and scores.pixel_accuracy == pytest.approx(3 / 4)
    assert scores.iou == pytest.approx([1 / 2, 1 / 2, 1.0])
    assert scores.accuracy == pytest.approx([1.0, 1 / 2, 1.0])
    assert scores.miou == pytest.approx(2 / 3) and scores.mean_accuracy == pytest.approx(5 / 6)
    # fwiou: gt frequencies 1/4, 2/4, 1/4
    assert scores.fwiou == pytest.approx(1 / 4 * 1 / 2 + 2 / 4 * 1 / 2 + 1 / 4 * 1.0)


def test_class_predicted_but_absent_from_ground_truth_scores_zero() -> None:
    matrix = ConfusionMatrix(3)
    matrix.update(torch.tensor([0, 0, 1, 1]), torch.tensor([0, 2, 1, 1]))
    scores = matrix.compute()
    assert scores.iou == pytest.approx([1 / 2, 1.0, 0.0])
    assert scores.miou == pytest.approx(1 / 2)  # the 0 counts in the mean
    assert scores.accuracy[2] is None and scores.mean_accuracy == pytest.approx(3 / 4)
    assert scores.absent == []


def test_class_absent_from_both_is_left_out_of_the_means() -> None:
    matrix = ConfusionMatrix(4)
    matrix.update(np.array([0, 0, 1, 1, 1]), np.array([0, 1, 1, 1, 0]))
    scores = matrix.compute()
    assert scores.iou[2] is None and scores.iou[3] is None and scores.absent == [2, 3]
    assert scores.iou[:2] == pytest.approx([1 / 3, 2 / 4])
    assert scores.miou == pytest.approx((1 / 3 + 1 / 2) / 2)
    assert scores.fwiou == pytest.approx(2 / 5 * 1 / 3 + 3 / 5 * 1 / 2)


def test_dataset_matrix_is_not_a_mean_of_per_image_scores() -> None:
    matrix = ConfusionMatrix(2)
    matrix.update(np.array([1, 1, 1, 1]), np.array([1, 1, 1, 1]))  # image A: class 1 perfect
    matrix.update(np.array([1, 0]), np.array([0, 0]))  # image B: class 1 missed once
    # dataset IoU_1 = 4 / 5, IoU_0 = 1 / 2 (per-image averaging would give other numbers)
    assert matrix.compute().iou == pytest.approx([1 / 2, 4 / 5])


def test_nothing_scored_gives_no_numbers() -> None:
    matrix = ConfusionMatrix(2)
    matrix.update(np.array([255, 255]), np.array([0, 1]))
    scores = matrix.compute()
    assert scores.pixels == 0 and scores.miou is None and scores.pixel_accuracy is None and scores.absent == [0, 1]


def test_out_of_range_indices_are_refused() -> None:
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        ConfusionMatrix(2).update(np.array([0, 2]), np.array([0, 0]))
    with pytest.raises(ValueError, match="pixels"):
        ConfusionMatrix(2).update(np.array([0, 1]), np.array([0]))
