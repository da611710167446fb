"""The default input and Caffe's data-layer preprocessing: determinism, layout, mean, padding, image files."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from converter.errors import CaffeError
from verify.inputs import VOC_MEAN_BGR, caffe_preprocess, load_image, synthetic_image


def test_synthetic_image_is_deterministic_per_seed() -> None:
    a = synthetic_image(41, 57, seed=3)
    assert a.shape == (41, 57, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, synthetic_image(41, 57, seed=3))
    assert not np.array_equal(a, synthetic_image(41, 57, seed=4))


def test_synthetic_image_pixels_are_pinned() -> None:
    """Every producer and verifier draws the same pixels: a change here invalidates stored references."""
    image = synthetic_image(321, 321, seed=0)
    assert int(image.astype(np.int64).sum()) == 42550670


def test_synthetic_image_has_photo_like_statistics() -> None:
    image = synthetic_image(321, 321).astype(np.float64)
    assert 80 < image.mean() < 170 and image.std() > 30  # not flat, not saturated
    assert (image == 0).mean() < 0.05 and (image == 255).mean() < 0.05
    # Sharp edges: some neighbouring pixels differ a lot; smooth regions: most differ little.
    step = np.abs(np.diff(image, axis=1)).max(axis=2)
    assert (step > 60).mean() > 0.001
    assert np.median(step) < 40


def test_preprocess_subtracts_mean_in_bgr_and_makes_nchw() -> None:
    image = np.zeros((2, 3, 3), np.uint8)
    image[0, 1] = (10, 20, 30)  # B, G, R at row 0, column 1
    blob = caffe_preprocess(image)
    assert blob.shape == (1, 3, 2, 3) and blob.dtype == np.float32
    np.testing.assert_allclose(blob[0, :, 0, 1], np.array([10, 20, 30]) - np.array(VOC_MEAN_BGR), rtol=1e-6)
    np.testing.assert_allclose(blob[0, :, 1, 2], -np.array(VOC_MEAN_BGR), rtol=1e-6)


def test_preprocess_scales_after_mean_subtraction() -> None:
    image = np.full((1, 1, 3), 200, np.uint8)
    blob = caffe_preprocess(image, mean=(100.0, 100.0, 100.0), scale=0.5)
    np.testing.assert_allclose(blob.ravel(), [50.0, 50.0, 50.0])


def test_padding_fills_bottom_and_right_with_the_mean() -> None:
    image = synthetic_image(5, 7)
    blob = caffe_preprocess(image, pad_to=(9, 8))
    assert blob.shape == (1, 3, 9, 8)
    np.testing.assert_array_equal(blob[:, :, :5, :7], caffe_preprocess(image))
    assert not blob[:, :, 5:, :].any() and not blob[:, :, :, 7:].any()


def test_padding_to_a_smaller_size_is_an_error() -> None:
    with pytest.raises(CaffeError, match="larger than the pad size"):
        caffe_preprocess(synthetic_image(10, 10), pad_to=(9, 12))


def test_load_image_reads_bgr(tmp_path: Path) -> None:
    image = synthetic_image(13, 17)
    path = tmp_path / "picture.png"
    cv2.imwrite(str(path), image)
    np.testing.assert_array_equal(load_image(path), image)


def test_load_image_gives_grey_pictures_three_channels(tmp_path: Path) -> None:
    path = tmp_path / "grey.png"
    cv2.imwrite(str(path), np.full((4, 6), 77, np.uint8))
    image = load_image(path)
    assert image.shape == (4, 6, 3) and (image == 77).all()


def test_missing_image_is_a_caffe_error(tmp_path: Path) -> None:
    with pytest.raises(CaffeError, match="no such image file"):
        load_image(tmp_path / "absent.jpg")


def test_unreadable_image_is_a_caffe_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.jpg"
    path.write_bytes(b"not a jpeg")
    with pytest.raises(CaffeError, match="cannot read") as info:
        load_image(path)
    assert str(path) in str(info.value)
