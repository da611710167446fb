"""`python -m segmentation predict`: any photo to a palette label PNG and an overlay with a legend."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from eval_case import PAD, write_tiny_checkpoint
from segmentation.__main__ import main as segmentation_main
from segmentation.overlay import LEGEND_WIDTH, overlay_image
from segmentation.predict import read_photo
from segmentation.voc import CLASS_NAMES, PALETTE


def test_photo_reading_applies_exif_orientation_and_converts_modes(tmp_path: Path) -> None:
    picture = np.zeros((10, 20, 3), np.uint8)
    picture[:, :10] = (255, 0, 0)  # red left half
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view"
    Image.fromarray(picture).save(tmp_path / "rotated.jpg", exif=exif, quality=100)
    upright = read_photo(tmp_path / "rotated.jpg", 0)
    assert upright.shape == (20, 10, 3)  # width and height swapped by the orientation tag
    assert upright[2, 5, 0] > 200 and upright[-3, 5, 0] < 60  # red on top after the rotation
    Image.fromarray(np.full((8, 8), 77, np.uint8)).save(tmp_path / "gray.png")
    assert read_photo(tmp_path / "gray.png", 0).shape == (8, 8, 3)
    rgba = np.zeros((6, 6, 4), np.uint8)
    rgba[..., 3] = 0  # fully transparent black shows as white
    Image.fromarray(rgba).save(tmp_path / "clear.png")
    assert read_photo(tmp_path / "clear.png", 0).min() == 255
    Image.fromarray(np.zeros((40, 100, 3), np.uint8)).save(tmp_path / "wide.png")
    assert read_photo(tmp_path / "wide.png", 50).shape == (20, 50, 3)


def test_overlay_blends_objects_and_lists_present_classes() -> None:
    image = np.full((30, 40, 3), 100, np.uint8)
    labels = np.zeros((30, 40), np.uint8)
    labels[5:15, 5:15] = 15
    labels[20:, :] = 255
    picture = np.asarray(overlay_image(image, labels, list(CLASS_NAMES), alpha=0.5))
    assert picture.shape == (max(30, 8 + 18 * 2), 40 + LEGEND_WIDTH, 3)
    np.testing.assert_array_equal(picture[0, 0], (100, 100, 100))  # background untouched
    np.testing.assert_array_equal(picture[25, 0], (100, 100, 100))  # ignore label untouched
    np.testing.assert_array_equal(picture[10, 10], np.rint((100 + PALETTE[15].astype(int)) / 2))
    swatch = picture[4 + 18 + 6, 40 + 12]  # second legend row: person
    np.testing.assert_array_equal(swatch, PALETTE[15])


def test_predict_writes_labels_and_overlays(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    checkpoint = write_tiny_checkpoint(tmp_path / "ckpt")
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (37, 51, 3), dtype=np.uint8)).save(photos / "a.jpg")
    Image.fromarray(np.full((20, 30), 128, np.uint8)).save(photos / "b.png")
    code = segmentation_main(["predict", str(photos), "--checkpoint", str(checkpoint), "--out", str(tmp_path / "out"),
                              "--pad", str(PAD), "--device", "cpu"])
    assert code == 0
    assert "2 images segmented" in capsys.readouterr().out
    label = Image.open(tmp_path / "out/a.png")
    assert label.mode == "P" and label.size == (51, 37)
    assert Image.open(tmp_path / "out/a_overlay.png").size[0] == 51 + LEGEND_WIDTH
    assert Image.open(tmp_path / "out/b.png").size == (30, 20)


def test_predict_bad_inputs_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    checkpoint = write_tiny_checkpoint(tmp_path / "ckpt")
    out = tmp_path / "out"
    args = ["--checkpoint", str(checkpoint), "--out", str(out), "--device", "cpu"]
    assert segmentation_main(["predict", str(tmp_path / "x.jpg"), str(tmp_path / "y.jpg"), *args]) == 2
    assert "2 inputs do not exist" in capsys.readouterr().err
    (tmp_path / "junk.jpg").write_bytes(b"\xff\xd8 not really")
    assert segmentation_main(["predict", str(tmp_path / "junk.jpg"), *args]) == 2
    error = capsys.readouterr().err.splitlines()[-1]  # after the progress bar
    assert error.startswith(f"error: {tmp_path / 'junk.jpg'}: cannot read the image")
