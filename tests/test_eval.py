"""`python -m segmentation eval` on a tiny checkpoint and a small synthetic VOC-layout dataset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from converter.loading import load_model
from eval_case import PAD, write_tiny_checkpoint
from models.deeplab import predict_labels
from segmentation.__main__ import main as segmentation_main
from segmentation.data import read_image, read_label, read_list
from segmentation.demo_data import DemoSpec, write_demo_dataset
from segmentation.evaluate import EvalOptions, load_saved_scores, padded_size, score_images
from segmentation.metrics import ConfusionMatrix
from segmentation.voc import save_label_png
from verify.inputs import caffe_preprocess

@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval")
    write_demo_dataset(root / "data", DemoSpec(train=1, val=3, min_size=40, max_size=90, seed=3))
    return {"root": root, "data": root / "data", "list": root / "data/list/val.txt",
            "checkpoint": write_tiny_checkpoint(root / "ckpt")}


def _eval(setup: dict[str, Path], out: Path, *extra: str) -> int:
    return segmentation_main(["eval", "--data", str(setup["data"]), "--list", str(setup["list"]), "--out", str(out),
                              "--workers", "0", "--quiet", "--pad", str(PAD), "--threads", "1", *extra])


def test_eval_report_matches_the_release_protocol_done_by_hand(setup: dict[str, Path], tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    # The exact protocol: no folding or layout change, so the by-hand run below must match bit for bit.
    assert _eval(setup, tmp_path / "out", "--checkpoint", str(setup["checkpoint"]), "--no-fold-bn",
                 "--no-channels-last") == 0
    printed = capsys.readouterr().out
    assert printed.splitlines()[0] == "checkpoint NOT verified (run `make verify-parity`)"
    assert "mIoU" in printed.splitlines()[-1]
    report = json.loads((tmp_path / "out/report.json").read_text())
    # By hand: pad each image to PAD with the mean, multi-scale net, zoom x8, crop, argmax, one dataset matrix.
    model, _ = load_model(setup["checkpoint"])
    expected = ConfusionMatrix(21)
    for sample in read_list(setup["list"], setup["data"]):
        image = read_image(sample.image)
        blob = torch.from_numpy(caffe_preprocess(image, pad_to=padded_size(*image.shape[:2], PAD)))
        labels = predict_labels(model, blob)[0, : image.shape[0], : image.shape[1]]
        expected.update(read_label(sample.label, 21), labels)
    scores = expected.compute()
    assert report["confusion_matrix"] == expected.matrix.tolist()
    assert report["miou"] == pytest.approx(scores.miou)
    for key in ("miou", "pixel_accuracy", "mean_accuracy", "fwiou"):
        assert 0.0 <= report[key] <= 1.0
    assert [row["name"] for row in report["per_class"]][:2] == ["background", "aeroplane"] and len(report["per_class"]) == 21
    absent = [row for row in report["per_class"] if row["iou"] is None]
    assert [row["name"] for row in absent] == report["absent_classes"]
    assert "null" in (tmp_path / "out/report.json").read_text()
    for name in ("report.md", "per_class_iou.png", "confusion_matrix.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0


def test_saved_predictions_and_scores_reproduce_the_evaluation(setup: dict[str, Path], tmp_path: Path) -> None:
    predictions, scores = tmp_path / "pred", tmp_path / "scores"
    assert _eval(setup, tmp_path / "a", "--checkpoint", str(setup["checkpoint"]),
                 "--save-predictions", str(predictions), "--save-scores", str(scores)) == 0
    assert _eval(setup, tmp_path / "b", "--predictions", str(predictions)) == 0
    first, second = (json.loads((tmp_path / name / "report.json").read_text()) for name in ("a", "b"))
    assert first["confusion_matrix"] == second["confusion_matrix"]
    for sample in read_list(setup["list"], setup["data"]):
        saved = Image.open(predictions / f"{sample.id}.png")
        assert saved.mode == "P"
        height, width = np.asarray(saved).shape
        zoomed = load_saved_scores(scores / f"{sample.id}.npy", height, width)
        assert np.load(scores / f"{sample.id}.npy").dtype == np.float16
        agreement = (zoomed.argmax(0).numpy() == np.asarray(saved)).mean()
        assert agreement > 0.97  # float16 storage may flip near-ties


def test_flip_averages_the_mirrored_scores(setup: dict[str, Path]) -> None:
    model, _ = load_model(setup["checkpoint"])
    image = torch.randn(1, 3, 37, 50) * 40
    plain, _ = score_images(model, [image], EvalOptions(pad=PAD))
    mirrored, _ = score_images(model, [image.flip(-1)], EvalOptions(pad=PAD))
    both, _ = score_images(model, [image], EvalOptions(pad=PAD, flip=True))
    torch.testing.assert_close(both[0], (plain[0] + mirrored[0].flip(-1)) / 2)
    scaled, _ = score_images(model, [image], EvalOptions(pad=PAD, scales=(1.0, 0.5)))
    assert scaled[0].shape == plain[0].shape


def test_larger_images_run_at_their_own_size_with_a_warning(setup: dict[str, Path], tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert padded_size(70, 20, PAD) == (97, PAD) and padded_size(500, 375) == (513, 513)
    assert _eval(setup, tmp_path / "out", "--checkpoint", str(setup["checkpoint"]), "--pad", "33",
                 "--save-predictions", str(tmp_path / "pred")) == 0
    assert "larger than 33 ran at their own aligned size" in capsys.readouterr().err
    for sample in read_list(setup["list"], setup["data"]):
        assert np.asarray(Image.open(tmp_path / "pred" / f"{sample.id}.png")).shape == read_image(sample.image).shape[:2]


def test_checkpoint_for_another_class_count_exits_2(setup: dict[str, Path], tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    other = write_tiny_checkpoint(tmp_path / "ckpt6", num_classes=6)
    assert _eval(setup, tmp_path / "out", "--checkpoint", str(other)) == 2
    error = capsys.readouterr().err.strip()
    assert error == f"error: {other}: checkpoint predicts 6 classes, the dataset has 21 (--num-classes)"
    assert not (tmp_path / "out/report.json").exists()


def test_bad_predictions_exit_2_naming_files(setup: dict[str, Path], tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "none"
    empty.mkdir()
    assert _eval(setup, tmp_path / "out", "--predictions", str(empty)) == 2
    assert "3 predictions are missing" in capsys.readouterr().err
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    for sample in read_list(setup["list"], setup["data"]):
        save_label_png(wrong / f"{sample.id}.png", np.zeros((7, 9), np.uint8))
    assert _eval(setup, tmp_path / "out", "--predictions", str(wrong)) == 2
    error = capsys.readouterr().err
    assert "prediction is 9x7 but the label" in error and str(wrong) in error and error.count("\n") == 1
    assert not (tmp_path / "out/report.json").exists()


def test_bad_label_midway_leaves_no_report(setup: dict[str, Path], tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    write_demo_dataset(data, DemoSpec(train=1, val=2, min_size=40, max_size=50, seed=1))
    bad = data / "SegmentationClassAug/val_00001.png"
    Image.fromarray(np.full((50, 40), 30, np.uint8)).save(bad)
    capsys.readouterr()
    code = segmentation_main(["eval", "--checkpoint", str(setup["checkpoint"]), "--data", str(data), "--list",
                              str(data / "list/val.txt"), "--out", str(tmp_path / "out"), "--workers", "1", "--quiet",
                              "--pad", str(PAD)])
    assert code == 2
    assert capsys.readouterr().err.strip() == f"error: {bad}: label values outside [0, 21) other than 255: 30"
    assert not (tmp_path / "out/report.json").exists()


def test_manifest_mean_is_used(setup: dict[str, Path], tmp_path: Path) -> None:
    from segmentation.evaluate import checkpoint_mean

    folder = write_tiny_checkpoint(tmp_path / "ckpt", mean_bgr=[104.0, 114.1, 120.1])
    assert _eval(setup, tmp_path / "out", "--checkpoint", str(folder)) == 0
    assert json.loads((tmp_path / "out/report.json").read_text())["mean_bgr"] == [104.0, 114.1, 120.1]
    assert checkpoint_mean({}) == (104.008, 116.669, 122.675)


def test_crf_option_refines_every_prediction(setup: dict[str, Path], tmp_path: Path) -> None:
    pytest.importorskip("pydensecrf.densecrf")
    assert _eval(setup, tmp_path / "out", "--checkpoint", str(setup["checkpoint"]), "--crf", "--crf-workers", "1",
                 "--crf-iterations", "3", "--save-predictions", str(tmp_path / "crf")) == 0
    report = json.loads((tmp_path / "out/report.json").read_text())
    assert "DenseCRF" in report["protocol"] and "iterations=3" in report["protocol"]
    assert _eval(setup, tmp_path / "again", "--predictions", str(tmp_path / "crf")) == 0
    assert json.loads((tmp_path / "again/report.json").read_text())["confusion_matrix"] == report["confusion_matrix"]


def test_bad_input_before_any_work_leaves_no_folder(setup: dict[str, Path], tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert _eval(setup, out, "--checkpoint", str(tmp_path / "absent")) == 2
    assert str(tmp_path / "absent") in capsys.readouterr().err
    assert _eval(setup, out, "--predictions", str(tmp_path / "absent")) == 2
    assert "the predictions folder does not exist" in capsys.readouterr().err
    assert _eval(setup, out, "--checkpoint", str(setup["checkpoint"]), "--pad", "100") == 2
    assert "--pad 100" in capsys.readouterr().err
    assert not out.exists()
