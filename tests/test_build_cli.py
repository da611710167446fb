"""`python -m converter build` / `inspect`: checkpoint folders that reload, the table, plugins, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from converter.cli import main
from converter.loading import load_model
from tests.registry_nets import RandomNet

REPO = Path(__file__).resolve().parents[1]

LAYERS = (
    'layer { name: "conv/1.a" type: "Convolution" bottom: "data" top: "conv" convolution_param { num_output: 4 kernel_size: 3 } }\n'
    'layer { name: "bn" type: "BatchNorm" bottom: "conv" top: "conv" }\n'
    'layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }\n'
    'layer { name: "pool" type: "Pooling" bottom: "conv" top: "pool" pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 1 } }\n'
    'layer { name: "ip" type: "InnerProduct" bottom: "pool" top: "ip" inner_product_param { num_output: ${CLASSES} } }\n'
    'layer { name: "prob" type: "Softmax" bottom: "ip" top: "prob" }\n'
)


@pytest.fixture()
def files(tmp_path: Path) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    blobs = {
        "conv/1.a": [rng.standard_normal((4, 3, 3, 3)).astype(np.float32), rng.standard_normal(4).astype(np.float32)],
        "bn": [rng.standard_normal(4).astype(np.float32) * 7, rng.uniform(1, 2, 4).astype(np.float32) * 7, np.array([7.0], np.float32)],
        "ip": [rng.standard_normal((5, 4 * 5 * 5)).astype(np.float32), rng.standard_normal(5).astype(np.float32)],
    }
    spec = RandomNet(LAYERS.replace("${CLASSES}", "5"), {"data": (1, 3, 10, 10)}, blobs)
    prototxt, caffemodel = spec.write(tmp_path / "src")
    prototxt.write_text(spec.text().replace("num_output: 5", "num_output: ${CLASSES}"))
    return prototxt, caffemodel


def _cli(capsys: pytest.CaptureFixture, *args: str | Path) -> tuple[int, str, str]:
    code = main([*map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_build_writes_a_folder_that_load_model_rebuilds(files, tmp_path, capsys) -> None:
    prototxt, caffemodel = files
    out = tmp_path / "built"
    code, stdout, stderr = _cli(capsys, "build", "--prototxt", prototxt, "--caffemodel", caffemodel, "--out", out,
                                "--define", "CLASSES=5")
    assert code == 0, stderr
    assert "6 layers run" in stdout and "outputs prob 1x5" in stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["arch"] == "caffe_net"
    assert "${CLASSES}" not in manifest["prototxt_text"] and "num_output: 5" in manifest["prototxt_text"]
    assert [layer["name"] for layer in manifest["model"]["graph"]["layers"]][0] == "conv/1.a"
    model, _ = load_model(out)
    from converter.caffe.load import load_net
    from converter.layers import build_net

    fresh = build_net(load_net(caffemodel, prototxt, defines={"CLASSES": "5"}))
    x = torch.randn(1, 3, 10, 10)
    with torch.no_grad():
        assert torch.equal(model(x)["prob"], fresh(x)["prob"])
    assert "layers.conv/1%2Ea.weight" in model.state_dict()


def test_inspect_prints_shapes_params_and_caffe_notes(files, capsys) -> None:
    prototxt, caffemodel = files
    code, stdout, stderr = _cli(capsys, "inspect", prototxt, "--caffemodel", caffemodel, "--define", "CLASSES=5")
    assert code == 0, stderr
    pool = next(line for line in stdout.splitlines() if line.startswith("pool "))
    assert "1x4x5x5" in pool and "ceil rounding: 5x5 (floor would give 4x4)" in pool and "AVE divisor" in pool
    bn = next(line for line in stdout.splitlines() if line.startswith("bn "))
    assert "eps 1e-05" in bn and "statistics / factor 7" in bn
    assert "over axis 1" in stdout and "6 layers run" in stdout


def test_plugin_module_registers_a_custom_type_from_the_command_line(tmp_path, capsys) -> None:
    spec = RandomNet('layer { name: "act" type: "Swish" bottom: "data" top: "act" }\n', {"data": (1, 2, 3, 3)})
    prototxt, caffemodel = spec.write(tmp_path)
    code, _, stderr = _cli(capsys, "inspect", prototxt)
    assert code == 2 and "unsupported layer type 'Swish'" in stderr
    code, stdout, stderr = _cli(capsys, "build", "--prototxt", prototxt, "--caffemodel", caffemodel,
                                "--out", tmp_path / "out", "--plugin", "tests.registry_plugin")
    assert code == 0, stderr
    model, manifest = load_model(tmp_path / "out")  # the manifest names the plugin, so the reload finds Swish
    assert manifest["model"]["plugins"] == ["tests.registry_plugin"]
    x = torch.randn(1, 2, 3, 3)
    assert torch.allclose(model(x)["act"], x * torch.sigmoid(x))


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--define", "CLASSES"], "--define 'CLASSES': expected NAME=VALUE"),
        (["--define", "CLASSES=5", "--define", "TYPO=1"], "--define TYPO: no such ${...} placeholder"),
        ([], "placeholders CLASSES are undefined"),
        (["--define", "CLASSES=5", "--input-shape", "data=1,x"], "dims must be whole numbers"),
        (["--define", "CLASSES=5", "--input-shape", "nothere=1,3,4,4"], "not inputs of the net"),
        (["--define", "CLASSES=5", "--plugin", "no_such_module_here"], "cannot import plugin module 'no_such_module_here'"),
        (["--define", "CLASSES=7"], "layer 'ip'"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_nothing_written(files, tmp_path, capsys, args, expected) -> None:
    prototxt, caffemodel = files
    out = tmp_path / "never"
    code, stdout, stderr = _cli(capsys, "build", "--prototxt", prototxt, "--caffemodel", caffemodel, "--out", out, *args)
    assert code == 2
    assert stderr.count("\n") == 1 and stderr.startswith("error: ") and expected in stderr, stderr
    assert not out.exists()


def test_build_runs_as_a_module_from_another_folder(files, tmp_path) -> None:
    prototxt, caffemodel = files
    result = subprocess.run(
        [sys.executable, "-m", "converter", "inspect", str(prototxt), "--define", "CLASSES=3"],
        cwd=tmp_path, capture_output=True, text=True, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
    assert "ip" in result.stdout and "1x3" in result.stdout
