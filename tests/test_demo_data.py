"""The synthetic VOC-layout dataset: layout, list formats, palette labels with 255 boundaries, reproducibility."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from segmentation.data import read_image, read_label, read_list
from segmentation.demo_data import DemoSpec, main, make_sample, write_demo_dataset


def test_demo_dataset_has_voc_layout_both_list_formats_and_palette_labels(tmp_path: Path) -> None:
    assert main(["--out", str(tmp_path), "--train", "4", "--val", "2", "--seed", "3"]) == 0
    pairs = read_list(tmp_path / "list" / "train.txt", tmp_path)
    ids = read_list(tmp_path / "list" / "train_ids.txt", tmp_path)
    assert [s.image for s in pairs] == [s.image for s in ids] and len(pairs) == 4
    assert (tmp_path / "list" / "train.txt").read_text().startswith("/JPEGImages/train_00000.jpg /SegmentationClassAug/train_00000.png\n")
    assert len(read_list(tmp_path / "list" / "val_ids.txt", tmp_path)) == 2
    for sample in pairs:
        with Image.open(sample.label) as label_image:
            assert label_image.mode == "P" and label_image.format == "PNG"
        with Image.open(sample.image) as image_file:
            assert image_file.format == "JPEG"
        label = read_label(sample.label, 21)
        assert read_image(sample.image).shape[:2] == label.shape
        assert 255 in label and 0 in label and label[(label > 0) & (label < 255)].size > 0


def test_boundaries_separate_objects_from_background() -> None:
    _, label = make_sample(DemoSpec(), np.random.default_rng(0))
    objects = (label > 0) & (label < 255)
    rows, cols = np.nonzero(objects)
    for y, x in zip(rows, cols):  # no object pixel touches background directly
        window = label[max(0, y - 1) : y + 2, max(0, x - 1) : x + 2]
        assert not (window == 0).any()


def test_same_seed_writes_the_same_dataset(tmp_path: Path) -> None:
    spec = DemoSpec(train=2, val=1, seed=7)
    write_demo_dataset(tmp_path / "a", spec)
    write_demo_dataset(tmp_path / "b", spec)
    for name in ("JPEGImages/train_00001.jpg", "SegmentationClassAug/train_00001.png", "list/val.txt"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
