"""The verifier's generic mode: registry-built nets against reference files (no checkpoint, or a build folder)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from converter.cli import main as converter_main
from tests.registry_nets import RandomNet
from verify.cli import main as verify_main

pytest.importorskip("cv2")

LAYERS = (
    'layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1" convolution_param { num_output: 4 kernel_size: 3 pad: 1 } }\n'
    'layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1" }\n'
    'layer { name: "scale1" type: "Scale" bottom: "conv1" top: "conv1" scale_param { bias_term: true } }\n'
    'layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }\n'
    'layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1" pooling_param { pool: MAX kernel_size: 3 stride: 2 } }\n'
    'layer { name: "conv2" type: "Convolution" bottom: "pool1" top: "conv2" convolution_param { num_output: 3 kernel_size: 1 } }\n'
    'layer { name: "sum" type: "Eltwise" bottom: "conv2" bottom: "conv2" top: "sum" }\n'
)


def _blobs(rng: np.random.Generator, conv2_scale: float = 1.0) -> dict:
    return {
        "conv1": [rng.standard_normal((4, 3, 3, 3)).astype(np.float32), rng.standard_normal(4).astype(np.float32)],
        "bn1": [rng.standard_normal(4).astype(np.float32) * 3, rng.uniform(1, 2, 4).astype(np.float32) * 3,
                np.array([3.0], np.float32)],
        "scale1": [rng.standard_normal(4).astype(np.float32), rng.standard_normal(4).astype(np.float32)],
        "conv2": [rng.standard_normal((3, 4, 1, 1)).astype(np.float32) * conv2_scale, rng.standard_normal(3).astype(np.float32)],
    }


@pytest.fixture()
def nets(tmp_path: Path) -> dict[str, Path]:
    """A net, the same net with conv2's weights changed by 0.1 %, and an OpenCV reference of the first."""
    from verify.opencv_reference import produce_opencv_reference

    good = RandomNet(LAYERS, {"data": (1, 3, 9, 9)}, _blobs(np.random.default_rng(0)))
    bad = RandomNet(LAYERS, {"data": (1, 3, 9, 9)}, _blobs(np.random.default_rng(0), conv2_scale=1.001))
    prototxt, caffemodel = good.write(tmp_path / "good")
    _, wrong = bad.write(tmp_path / "bad")
    feeds = good.feeds(np.random.default_rng(1))
    reference = produce_opencv_reference(prototxt, caffemodel, feeds, tmp_path / "reference.h5")
    return {"prototxt": prototxt, "caffemodel": caffemodel, "wrong": wrong, "reference": reference}


def test_verify_without_checkpoint_passes_and_writes_the_report(nets, tmp_path, capsys) -> None:
    report = tmp_path / "report"
    code = verify_main(["--prototxt", str(nets["prototxt"]), "--caffemodel", str(nets["caffemodel"]),
                        "--reference", str(nets["reference"]), "--report-dir", str(report)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "parity PASS" in out and "nothing recorded" in out
    rows = json.loads((report / "report.json").read_text())["blobs"]
    assert [row["name"] for row in rows] == ["conv1", "pool1", "conv2", "sum"]
    # conv1's step is the whole in-place chain, fed the reference's data
    assert "Convolution conv1 + BatchNorm bn1 + Scale scale1 + ReLU relu1" in (report / "report.md").read_text()


def test_verify_without_checkpoint_names_the_first_diverging_layer(nets, tmp_path, capsys) -> None:
    code = verify_main(["--prototxt", str(nets["prototxt"]), "--caffemodel", str(nets["wrong"]),
                        "--reference", str(nets["reference"]), "--report-dir", str(tmp_path / "report")])
    out = capsys.readouterr().out
    assert code == 1
    result = json.loads((tmp_path / "report" / "report.json").read_text())
    assert result["first_diverging"] == "conv2"


def test_verify_a_build_folder_against_the_opencv_oracle_records_the_verdict(nets, tmp_path, capsys) -> None:
    out_dir = tmp_path / "built"
    assert converter_main(["build", "--prototxt", str(nets["prototxt"]), "--caffemodel", str(nets["caffemodel"]),
                           "--out", str(out_dir)]) == 0
    code = verify_main(["--checkpoint", str(out_dir)])
    assert code == 0, capsys.readouterr()
    manifest = json.loads((out_dir / "manifest.json").read_text())
    assert manifest["parity"]["verdict"] == "pass"
    assert (out_dir / "parity" / "reference_opencv.h5").is_file()


def test_verify_without_checkpoint_needs_all_three_files(nets, capsys) -> None:
    code = verify_main(["--prototxt", str(nets["prototxt"]), "--caffemodel", str(nets["caffemodel"])])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--reference" in err
