"""`python -m converter`: end to end on synthetic release files, and one-line errors for bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from converter.checkpoint import read_checkpoint, sha256_file
from converter.loading import load_model
from converter.cli import main
from converter.synthetic.netspec import deeplab_net_param
from converter.synthetic.weights import synthetic_blobs, write_synthetic_deeplab
from converter.caffe.wire import write_caffemodel
from models.deeplab import DeepLabV2MSC, ResNetConfig

CONFIG = ResNetConfig.tiny()
SIZE = (65, 65)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("release")
    msc = write_synthetic_deeplab(folder, "msc_test", CONFIG, seed=0, input_size=SIZE)
    init = write_synthetic_deeplab(folder, "init", CONFIG, seed=1, input_size=SIZE)
    return {"caffemodel": msc.caffemodel, "prototxt": msc.prototxt, "init": init.caffemodel}


def _convert(capsys: pytest.CaptureFixture, *args: str | Path) -> tuple[int, str, str]:
    code = main(["convert", "--quiet", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _snapshot(folder: Path) -> dict[str, str]:
    return {path.name: sha256_file(path) for path in sorted(folder.iterdir())}


def test_convert_msc_release_files_end_to_end(release, tmp_path: Path, capsys) -> None:
    out = tmp_path / "voc12"
    code, stdout, stderr = _convert(capsys, "--caffemodel", release["caffemodel"], "--prototxt", release["prototxt"],
                                    "--out", out)
    assert code == 0, stderr
    assert "tower copies checked identical" in stdout and "surgery: head kept (21 classes already)" in stdout
    model, manifest = load_model(out)
    assert isinstance(model, DeepLabV2MSC)
    assert manifest["inputs"]["caffemodel"]["sha256"] == sha256_file(release["caffemodel"])
    assert manifest["inputs"]["prototxt"]["sha256"] == sha256_file(release["prototxt"])
    assert manifest["prototxt_text"] == release["prototxt"].read_text()
    assert manifest["model"]["config"] == {"blocks": [2, 2, 2, 2], "stem_width": 8, "widths": [4, 8, 16, 32]}
    assert manifest["coverage"]["tower_copies_checked"] > 0 and manifest["surgery"]["kept"] is True
    from_pth, _ = read_checkpoint(out / "model.pth")
    from_safetensors, _ = read_checkpoint(out / "model.safetensors")
    assert all(torch.equal(from_pth[k], from_safetensors[k]) for k in from_pth)


def test_convert_records_the_eps_of_the_prototxt_in_use(release, tmp_path: Path, capsys) -> None:
    text = release["prototxt"].read_text().replace("use_global_stats: true", "use_global_stats: true\n    eps: 0.001")
    prototxt = _write(tmp_path / "eps.prototxt", text.encode())
    code, stdout, stderr = _convert(capsys, "--caffemodel", release["caffemodel"], "--prototxt", prototxt, "--out", tmp_path / "o")
    assert code == 0, stderr
    assert "bn eps 0.001" in stdout
    model, manifest = load_model(tmp_path / "o")
    assert manifest["model"]["bn_eps"] == 1e-3
    assert {m.eps for m in model.modules() if hasattr(m, "running_var")} == {1e-3}


def test_hdf5_weights_convert_like_the_binary_caffemodel(release, tmp_path: Path, capsys) -> None:
    from converter.caffe.caffemodel import read_caffemodel
    from converter.caffe.hdf5 import write_hdf5_weights

    net = read_caffemodel(release["caffemodel"])
    h5 = tmp_path / "train_iter_20000.caffemodel.h5"
    write_hdf5_weights(h5, {layer.name: layer.blobs for layer in net.layers if layer.blobs})
    code, _, stderr = _convert(capsys, "--caffemodel", h5, "--prototxt", release["prototxt"], "--out", tmp_path / "h5")
    assert code == 0, stderr
    assert _convert(capsys, "--caffemodel", release["caffemodel"], "--out", tmp_path / "bin")[0] == 0
    from_h5, _ = read_checkpoint(tmp_path / "h5")
    from_binary, _ = read_checkpoint(tmp_path / "bin")
    assert all(torch.equal(from_h5[k], from_binary[k]) for k in from_binary)


def test_convert_init_replaces_the_coco_head_and_reports_it(release, tmp_path: Path, capsys) -> None:
    code, stdout, stderr = _convert(capsys, "--caffemodel", release["init"], "--out", tmp_path, "--seed", "4")
    assert code == 0, stderr
    assert "dropped 8 head tensors (91 classes), created 8 for 21 classes" in stdout
    state_dict, manifest = read_checkpoint(tmp_path)
    assert manifest["surgery"]["source_classes"] == 91 and manifest["surgery"]["seed"] == 4
    assert manifest["model"]["num_classes"] == 21 and state_dict["aspp.branches.0.bias"].shape == (21,)
    assert "fc1_coco_c0" in manifest["prototxt_text"], "without a prototxt the caffemodel's own definition is kept"


def test_surgery_off_refuses_a_head_of_another_class_count(release, tmp_path: Path, capsys) -> None:
    code, _, stderr = _convert(capsys, "--caffemodel", release["init"], "--out", tmp_path / "o", "--surgery", "off")
    assert code == 2 and stderr.count("\n") == 1
    assert "head has 91 classes, --classes is 21" in stderr
    assert not (tmp_path / "o").exists()


def test_legacy_export_and_import_round_trip(release, tmp_path: Path, capsys) -> None:
    code, _, stderr = _convert(capsys, "--caffemodel", release["caffemodel"], "--out", tmp_path / "a", "--export-legacy")
    assert code == 0, stderr
    legacy = torch.load(tmp_path / "a" / "legacy_model.pth", weights_only=True)
    assert "Scale.layer5.conv2d_list.0.weight" in legacy
    assert main(["import-legacy", "--from-legacy", str(tmp_path / "a" / "legacy_model.pth"), "--out", str(tmp_path / "b")]) == 0
    ours, _ = read_checkpoint(tmp_path / "a")
    imported, manifest = read_checkpoint(tmp_path / "b")
    assert manifest["inputs"]["legacy_checkpoint"]["sha256"] == sha256_file(tmp_path / "a" / "legacy_model.pth")
    assert ours.keys() == imported.keys() and all(torch.equal(ours[k], imported[k]) for k in ours)


def _nan_caffemodel(path: Path) -> Path:
    blobs = synthetic_blobs(CONFIG, seed=0)
    blobs["res3a_branch2c"][0][1, 2, 0, 0] = np.nan
    write_caffemodel(path, deeplab_net_param("single_scale", CONFIG, 21, SIZE, "fc1_voc12"), blobs)
    return path


BAD_INPUTS = {
    # name: (how to make the bad input in tmp, expected text in the error line)
    "nonexistent": (lambda tmp, rel: ["--caffemodel", tmp / "nope.caffemodel"], "nope.caffemodel: caffemodel does not exist"),
    "truncated": (
        lambda tmp, rel: ["--caffemodel", _write(tmp / "cut.caffemodel", rel["caffemodel"].read_bytes()[:-1000])],
        "cut.caffemodel",
    ),
    "not-protobuf": (
        lambda tmp, rel: ["--caffemodel", _write(tmp / "text.caffemodel", b"\xff\xfe this is not a caffemodel\n" * 40)],
        "text.caffemodel",
    ),
    "prototxt-syntax": (
        lambda tmp, rel: ["--caffemodel", rel["caffemodel"], "--prototxt",
                          _write(tmp / "bad.prototxt", b'name: "x"\nlayer {\n  name: "conv1"\n  type: \n}\n')],
        "bad.prototxt",
    ),
    "nan-weights": (lambda tmp, rel: ["--caffemodel", _nan_caffemodel(tmp / "nan.caffemodel")], "res3a_branch2c"),
    "unwritable-out": (lambda tmp, rel: ["--caffemodel", rel["caffemodel"]], "cannot create the output folder"),
}


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_error_line_exit_2_and_nothing_written(release, tmp_path: Path, capsys, case: str) -> None:
    make, expected = BAD_INPUTS[case]
    args = make(tmp_path, release)
    fresh = tmp_path / "fresh_out"
    if case == "unwritable-out":
        (tmp_path / "blocker").write_text("a file where a folder should be")
        fresh = tmp_path / "blocker" / "out"
    code, stdout, stderr = _convert(capsys, *args, "--out", fresh)
    assert code == 2
    assert stderr.startswith("error: ") and stderr.count("\n") == 1, stderr
    assert expected in stderr
    assert not fresh.exists()


@pytest.mark.parametrize("case", ["truncated", "nan-weights"])
def test_failed_conversion_keeps_an_existing_checkpoint_intact(release, tmp_path: Path, capsys, case: str) -> None:
    out = tmp_path / "ckpt"
    assert _convert(capsys, "--caffemodel", release["caffemodel"], "--out", out)[0] == 0
    before = _snapshot(out)
    make, _ = BAD_INPUTS[case]
    code, _, _ = _convert(capsys, *make(tmp_path, release), "--out", out)
    assert code == 2 and _snapshot(out) == before


@pytest.mark.parametrize("name", ["train_iter_20000.caffemodel", "init.caffemodel"])
def test_missing_release_file_says_where_it_comes_from(tmp_path: Path, capsys, name: str) -> None:
    code, _, stderr = _convert(capsys, "--caffemodel", tmp_path / "data" / name, "--out", tmp_path / "o")
    assert code == 2
    assert "DeepLab-v2 release" in stderr and "make demo" in stderr


def test_module_entry_point_exits_2_with_one_line(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "converter", "convert", "--caffemodel", str(tmp_path / "x.caffemodel"),
         "--out", str(tmp_path / "o")],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, done.stderr
    assert done.stdout == ""


@pytest.mark.slow
def test_full_size_msc_caffemodel_converts_with_the_release_prototxt(shared_reference: Path, tmp_path: Path, capsys) -> None:
    files = write_synthetic_deeplab(tmp_path / "src", "msc_test", ResNetConfig.resnet101(), seed=0)
    prototxt = shared_reference / "deeplab_v2" / "voc12_resnet101_msc_test_seed_513.prototxt"
    code, stdout, stderr = _convert(capsys, "--caffemodel", files.caffemodel, "--prototxt", prototxt, "--out", tmp_path / "o")
    assert code == 0, stderr
    assert "632 blobs -> 528 keys" in stdout and "632 layers (1264 blobs)" in stdout
    model, _ = load_model(tmp_path / "o")
    assert sum(p.numel() for p in model.parameters()) > 42_000_000
