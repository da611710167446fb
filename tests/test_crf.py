"""DenseCRF with the real pydensecrf2 package: it must pull a blurred prediction onto the image's edges."""

from __future__ import annotations

import numpy as np
import pytest

from segmentation.crf import CRFParams, CRFWorkers, dense_crf

pytest.importorskip("pydensecrf.densecrf")


def _square_scene() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A 48x64 image with a sharp bright square, its true labels, and blurred (over-smoothed) probabilities."""
    height, width = 48, 64
    truth = np.zeros((height, width), np.uint8)
    truth[12:36, 20:44] = 1
    rng = np.random.default_rng(0)
    image = np.where(truth[..., None] == 1, 200, 40).astype(np.float64) + rng.normal(0, 4, (height, width, 3))
    image = np.clip(image, 0, 255).astype(np.uint8)
    # A blurred, shifted belief: the square's probability spreads 6 pixels beyond its edges and is weak inside.
    yy, xx = np.mgrid[:height, :width]
    distance = np.maximum(np.maximum(14 - yy, yy - 34), np.maximum(22 - xx, xx - 46)).astype(np.float64)
    foreground = 1.0 / (1.0 + np.exp(distance / 3.0))
    probabilities = np.stack([1.0 - foreground, foreground]).astype(np.float32)
    return image, truth, probabilities


def test_crf_sharpens_a_blurred_prediction_along_edges() -> None:
    image, truth, probabilities = _square_scene()
    before = (probabilities.argmax(axis=0) != truth).sum()
    assert before > 150  # the blurred belief is wrong around the whole border
    unchanged = dense_crf(image, probabilities, CRFParams(iterations=0))
    assert (unchanged != truth).sum() == before  # zero iterations: the argmax of the unary alone
    after = (dense_crf(image, probabilities, CRFParams()) != truth).sum()  # the project page's defaults
    assert after < before / 10


def test_crf_workers_return_results_in_order() -> None:
    image, truth, probabilities = _square_scene()
    results: list[tuple[int, np.ndarray]] = []
    workers = CRFWorkers(CRFParams(iterations=2), workers=1)
    try:
        for tag in range(3):
            workers.submit(tag, image, probabilities, lambda t, labels: results.append((t, labels)))
        workers.drain(lambda t, labels: results.append((t, labels)))
    finally:
        workers.close()
    assert [tag for tag, _ in results] == [0, 1, 2]
    assert all(labels.shape == truth.shape for _, labels in results)
