"""The shared dataset code: both list formats, labels read as indices, every bad input one clear error."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from converter.errors import CaffeError
from segmentation.data import Sample, check_pair, read_image, read_label, read_list
from segmentation.voc import CLASS_NAMES, IGNORE_LABEL, NUM_CLASSES, PALETTE, save_label_png


def _write_pair(root: Path, stem: str, size: tuple[int, int] = (5, 4)) -> None:
    (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
    (root / "SegmentationClassAug").mkdir(parents=True, exist_ok=True)
    height, width = size
    cv2.imwrite(str(root / "JPEGImages" / f"{stem}.jpg"), np.full((height, width, 3), 90, np.uint8))
    save_label_png(root / "SegmentationClassAug" / f"{stem}.png", np.ones((height, width), np.uint8))


def test_voc_facts_match_the_devkit() -> None:
    assert NUM_CLASSES == 21 and CLASS_NAMES[0] == "background" and CLASS_NAMES[15] == "person"
    assert CLASS_NAMES[-1] == "tvmonitor" and IGNORE_LABEL == 255
    assert PALETTE[1].tolist() == [128, 0, 0] and PALETTE[15].tolist() == [192, 128, 128]
    assert PALETTE[255].tolist() == [224, 224, 192]


def test_deeplab_pair_list_paths_are_relative_to_root(tmp_path: Path) -> None:
    _write_pair(tmp_path, "a")
    _write_pair(tmp_path, "b")
    lines = "/JPEGImages/a.jpg /SegmentationClassAug/a.png\n\n/JPEGImages/b.jpg\n"
    (tmp_path / "val.txt").write_text(lines)
    samples = read_list(tmp_path / "val.txt", tmp_path)
    assert samples == [
        Sample("a", tmp_path / "JPEGImages/a.jpg", tmp_path / "SegmentationClassAug/a.png"),
        Sample("b", tmp_path / "JPEGImages/b.jpg", None),
    ]


def test_bare_id_list_resolves_folders_and_extensions(tmp_path: Path) -> None:
    _write_pair(tmp_path, "2007_000032")
    (tmp_path / "ids.txt").write_text("2007_000032\n")
    assert read_list(tmp_path / "ids.txt", tmp_path) == [
        Sample("2007_000032", tmp_path / "JPEGImages/2007_000032.jpg", tmp_path / "SegmentationClassAug/2007_000032.png")
    ]
    (tmp_path / "SegmentationClassAug/2007_000032.png").unlink()
    unlabelled = read_list(tmp_path / "ids.txt", tmp_path, labels=False)
    assert unlabelled[0].label is None


def test_every_missing_file_is_reported_at_once(tmp_path: Path) -> None:
    (tmp_path / "ids.txt").write_text("".join(f"img{i}\n" for i in range(8)))
    with pytest.raises(CaffeError) as raised:
        read_list(tmp_path / "ids.txt", tmp_path)
    message = str(raised.value)
    assert "16 listed files are missing" in message and "img0.jpg" in message and "(+10 more)" in message
    assert str(tmp_path / "ids.txt") in message and "\n" not in message


def test_empty_list_is_refused(tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(CaffeError, match="empty"):
        read_list(tmp_path / "empty.txt", tmp_path)
    with pytest.raises(CaffeError, match="cannot read the list"):
        read_list(tmp_path / "absent.txt", tmp_path)


def test_palette_label_reads_indices_not_colours(tmp_path: Path) -> None:
    labels = np.array([[0, 15, 255], [20, 1, 2]], np.uint8)
    save_label_png(tmp_path / "l.png", labels)
    assert Image.open(tmp_path / "l.png").mode == "P"
    np.testing.assert_array_equal(read_label(tmp_path / "l.png", 21), labels)


def test_grayscale_label_reads_indices(tmp_path: Path) -> None:
    labels = np.array([[0, 3], [255, 7]], np.uint8)
    Image.fromarray(labels).save(tmp_path / "g.png")
    np.testing.assert_array_equal(read_label(tmp_path / "g.png", 21), labels)


def test_out_of_range_label_values_are_named(tmp_path: Path) -> None:
    Image.fromarray(np.array([[0, 21], [254, 255]], np.uint8)).save(tmp_path / "bad.png")
    with pytest.raises(CaffeError, match=r"bad.png: label values outside \[0, 21\) other than 255: 21, 254"):
        read_label(tmp_path / "bad.png", 21)


def test_colour_label_and_garbage_are_refused(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(CaffeError, match="mode 'RGB'"):
        read_label(tmp_path / "rgb.png", 21)
    (tmp_path / "junk.png").write_bytes(b"not a png")
    with pytest.raises(CaffeError, match="junk.png: cannot read the label"):
        read_label(tmp_path / "junk.png", 21)


def test_image_is_bgr_and_unreadable_image_named(tmp_path: Path) -> None:
    Image.fromarray(np.array([[[255, 0, 0]]], np.uint8)).save(tmp_path / "red.png")
    assert read_image(tmp_path / "red.png").tolist() == [[[0, 0, 255]]]
    Image.fromarray(np.array([[7]], np.uint8)).save(tmp_path / "gray.png")
    assert read_image(tmp_path / "gray.png").shape == (1, 1, 3)
    (tmp_path / "cut.jpg").write_bytes(b"\xff\xd8\xff")
    with pytest.raises(CaffeError, match="cut.jpg: cannot read the image"):
        read_image(tmp_path / "cut.jpg")


def test_size_mismatch_names_both_files() -> None:
    sample = Sample("x", Path("/d/x.jpg"), Path("/d/x.png"))
    with pytest.raises(CaffeError, match=r"/d/x.jpg: image is 3x2 but its label /d/x.png is 3x3"):
        check_pair(np.zeros((2, 3, 3), np.uint8), np.zeros((3, 3), np.uint8), sample)
    check_pair(np.zeros((2, 3, 3), np.uint8), np.zeros((2, 3), np.uint8), sample)
