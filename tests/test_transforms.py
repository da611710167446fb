"""The training transform follows the fork's TransformImgAndSeg rule by rule, checked against OpenCV."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from converter.errors import CaffeError
from segmentation.transforms import Draw, TransformParams, apply, draw, scaled_size, transform

MEAN = (104.008, 116.669, 122.675)


def _pair(height: int, width: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    label = rng.integers(0, 5, (height, width), dtype=np.uint8)
    label[::7] = 255
    return image, label


def _params(crop: int = 33, **changes) -> TransformParams:
    return TransformParams(crop_height=crop, crop_width=crop, mean_bgr=MEAN, **changes)


def test_scaled_size_truncates_the_float32_product_like_caffes_int_times_float() -> None:
    assert scaled_size(333, 101, 0.75) == (249, 75)  # 249.75, 75.75 truncated
    assert scaled_size(101, 333, 1.25) == (126, 416)  # 126.25, 416.25
    assert scaled_size(375, 500, 0.5) == (187, 250)


def test_scaling_uses_opencv_bilinear_for_the_image_and_nearest_for_the_label() -> None:
    image, label = _pair(60, 50)
    params = _params()
    data, out_label = apply(image, label, Draw(mirror=False, scale=1.5, h_off=5, w_off=7), params)
    expected_image = cv2.resize(image, (75, 90), interpolation=cv2.INTER_LINEAR).astype(np.float32)[5:38, 7:40]
    expected_label = cv2.resize(label, (75, 90), interpolation=cv2.INTER_NEAREST)[5:38, 7:40]
    np.testing.assert_array_equal(data, (expected_image - np.float32(MEAN)).transpose(2, 0, 1))
    np.testing.assert_array_equal(out_label, expected_label)


def test_scaled_labels_are_never_blended() -> None:
    image, label = _pair(61, 47)
    for scale in (0.5, 0.75, 1.25, 1.5):
        _, out_label = apply(image, label, Draw(False, scale, 0, 0), _params())
        assert set(np.unique(out_label)) <= set(np.unique(label)) | {255}


def test_padding_goes_bottom_right_with_the_mean_and_the_ignore_label() -> None:
    image, label = _pair(20, 25)
    data, out_label = apply(image, label, Draw(False, 1.0, 0, 0), _params())
    assert data.shape == (3, 33, 33) and out_label.shape == (33, 33)
    np.testing.assert_array_equal(data[:, 20:, :], 0)  # the mean, subtracted
    np.testing.assert_array_equal(data[:, :, 25:], 0)
    assert (out_label[20:, :] == 255).all() and (out_label[:, 25:] == 255).all()
    np.testing.assert_array_equal(data[:, :20, :25], (image.astype(np.float32) - np.float32(MEAN)).transpose(2, 0, 1))
    np.testing.assert_array_equal(out_label[:20, :25], label)


def test_mirror_flips_the_cropped_window_not_the_image_before_cropping() -> None:
    image, label = _pair(40, 60)
    params = _params()
    plain, plain_label = apply(image, label, Draw(False, 1.0, 3, 4), params)
    mirrored, mirrored_label = apply(image, label, Draw(True, 1.0, 3, 4), params)
    np.testing.assert_array_equal(mirrored, plain[:, :, ::-1])
    np.testing.assert_array_equal(mirrored_label, plain_label[:, ::-1])
    flipped_first, _ = apply(image[:, ::-1].copy(), label[:, ::-1].copy(), Draw(False, 1.0, 3, 4), params)
    assert not np.array_equal(mirrored, flipped_first)


def test_random_draws_come_in_caffes_order_mirror_scale_then_h_then_w_offsets() -> None:
    params = _params(scale_factors=(0.5, 0.75, 1.0, 1.25, 1.5))
    for seed in range(20):
        choice = draw(np.random.default_rng(seed), 100, 80, params)
        replay = np.random.default_rng(seed)
        mirror = bool(replay.integers(2))
        scale = params.scale_factors[int(replay.integers(5))]
        height, width = scaled_size(100, 80, scale)
        height, width = max(height, 33), max(width, 33)
        h_off = int(replay.integers(height - 33 + 1))
        w_off = int(replay.integers(width - 33 + 1))
        assert choice == Draw(mirror, scale, h_off, w_off)


def test_without_mirror_no_mirror_draw_is_made() -> None:
    params = _params(mirror=False, scale_factors=(0.5, 1.5))
    choice = draw(np.random.default_rng(3), 100, 100, params)
    replay = np.random.default_rng(3)
    assert choice.mirror is False
    assert choice.scale == (0.5, 1.5)[int(replay.integers(2))]


def test_test_phase_takes_the_centre_crop() -> None:
    params = _params(mirror=False, scale_factors=())
    choice = draw(np.random.default_rng(0), 50, 60, params, train=False)
    assert choice == Draw(False, 1.0, (50 - 33) // 2, (60 - 33) // 2)


def test_crop_must_be_32k_plus_1_and_the_error_names_valid_ones() -> None:
    with pytest.raises(CaffeError, match="289, 321, 353"):
        TransformParams(crop_height=320, crop_width=320)
    with pytest.raises(CaffeError, match="32k\\+1"):
        TransformParams(crop_height=321, crop_width=64)
    TransformParams(crop_height=65, crop_width=353)


def test_value_scale_multiplies_after_the_mean() -> None:
    image, label = _pair(33, 33)
    data, _ = transform(image, label, _params(mirror=False, scale_factors=(), value_scale=0.5), np.random.default_rng(0))
    np.testing.assert_array_equal(data, ((image.astype(np.float32) - np.float32(MEAN)) * 0.5).transpose(2, 0, 1))


def test_whole_transform_equals_caffes_steps_done_with_opencv() -> None:
    """resize, copyMakeBorder (mean / ignore) bottom-right, crop, mirror, mean: as TransformImgAndSeg does them."""
    image, label = _pair(50, 27, seed=4)
    params = _params(scale_factors=(0.5, 0.75, 1.0, 1.25, 1.5))
    for seed in range(30):
        data, out_label = transform(image, label, params, np.random.default_rng(seed))
        choice = draw(np.random.default_rng(seed), 50, 27, params)
        img, seg = image, label
        if choice.scale != 1:
            height, width = scaled_size(50, 27, choice.scale)
            img = cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)
            seg = cv2.resize(label, (width, height), interpolation=cv2.INTER_NEAREST)
        pad_h, pad_w = max(33 - img.shape[0], 0), max(33 - img.shape[1], 0)
        img = cv2.copyMakeBorder(img.astype(np.float64), 0, pad_h, 0, pad_w, cv2.BORDER_CONSTANT, value=MEAN)
        seg = cv2.copyMakeBorder(seg, 0, pad_h, 0, pad_w, cv2.BORDER_CONSTANT, value=255)
        img = img[choice.h_off : choice.h_off + 33, choice.w_off : choice.w_off + 33]
        seg = seg[choice.h_off : choice.h_off + 33, choice.w_off : choice.w_off + 33]
        if choice.mirror:
            img, seg = img[:, ::-1], seg[:, ::-1]
        expected = (img.astype(np.float32) - np.float32(MEAN)).transpose(2, 0, 1)
        np.testing.assert_array_equal(data, expected)
        np.testing.assert_array_equal(out_label, seg)
