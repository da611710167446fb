"""export-caffe: a checkpoint folder back to a binary .caffemodel, exact under convert, run by the OpenCV oracle."""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest

from converter.caffe.load import load_net
from converter.caffe.prototxt import read_prototxt
from converter.checkpoint import SAFETENSORS_FILE, read_checkpoint, sha256_file
from converter.cli import main as converter_main
from converter.deeplab.names import tower_copy_names
from converter.export.caffemodel import export_caffemodel
from converter.export.record import sidecar_path
from converter.synthetic.weights import write_synthetic_deeplab
from models.deeplab import ResNetConfig

INPUT_SIZE = (65, 65)


def _run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = converter_main(argv)
    return code, out.getvalue(), err.getvalue()


def _convert(caffemodel: Path, out: Path, prototxt: Path | None = None) -> Path:
    argv = ["convert", "--caffemodel", str(caffemodel), "--out", str(out), "-q"]
    code, _, err = _run(argv + (["--prototxt", str(prototxt)] if prototxt else []))
    assert code == 0, err
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("export_caffe")
    files = write_synthetic_deeplab(root / "caffe", "msc_test", ResNetConfig.tiny(), input_size=INPUT_SIZE)
    checkpoint = _convert(files.caffemodel, root / "checkpoint", files.prototxt)
    return {"root": root, "prototxt": files.prototxt, "caffemodel": files.caffemodel, "checkpoint": checkpoint}


def _assert_identical_state_dicts(a: Path, b: Path) -> None:
    ours, _ = read_checkpoint(a)
    theirs, _ = read_checkpoint(b)
    assert list(ours) == list(theirs)
    for key, tensor in ours.items():
        other = theirs[key]
        assert tensor.dtype == other.dtype and tensor.shape == other.shape, key
        assert tensor.numpy().tobytes() == other.numpy().tobytes(), key


def test_export_caffe_round_trip_gives_identical_tensors(tiny: dict[str, Path]) -> None:
    out = tiny["root"] / "roundtrip" / "exported.caffemodel"
    out.parent.mkdir()
    code, printed, err = _run(["export-caffe", "--checkpoint", str(tiny["checkpoint"]), "--prototxt",
                               str(tiny["prototxt"]), "--out", str(out)])
    assert code == 0, err
    assert "tensors identical" in printed
    again = _convert(out, tiny["root"] / "roundtrip" / "checkpoint")  # the file alone: it holds its net
    _assert_identical_state_dicts(tiny["checkpoint"], again)
    record = json.loads(sidecar_path(out).read_text())
    assert record["source"]["sha256"][SAFETENSORS_FILE] == sha256_file(tiny["checkpoint"] / SAFETENSORS_FILE)
    assert record["output"]["sha256"] == sha256_file(out)
    assert record["round_trip"]["tensors_identical"] == len(read_checkpoint(again)[0])


def test_export_caffe_writes_factor_one_and_every_tower_copy(tiny: dict[str, Path]) -> None:
    out = tiny["root"] / "factor.caffemodel"
    export_caffemodel(tiny["checkpoint"], out, tiny["prototxt"])
    original = load_net(weights=tiny["caffemodel"])
    exported = load_net(weights=out)
    state_dict, _ = read_checkpoint(tiny["checkpoint"])
    with_blobs = [layer.name for layer in original.layers if layer.blobs]
    assert [layer.name for layer in exported.layers if layer.blobs] == with_blobs
    for layer in exported.layers:
        if layer.type == "BatchNorm":
            assert layer.blobs[2].tolist() == [1.0], layer.name  # synthetic sources have factors != 1
    stats = exported.layer("bn_conv1").blobs
    assert stats[0].tobytes() == state_dict["backbone.bn1.running_mean"].numpy().tobytes()
    for copy in tower_copy_names("res2a_branch2a", "fc1_voc12"):
        assert exported.layer(copy).blobs[0].tobytes() == exported.layer("res2a_branch2a").blobs[0].tobytes()
    assert original.layer("bn_conv1").blobs[2][0] != 1.0


def test_export_caffe_runs_in_the_opencv_oracle_and_verifies_against_the_checkpoint(tiny: dict[str, Path]) -> None:
    pytest.importorskip("cv2")
    from verify.activations import read_activations
    from verify.compare import ModelSpec, verify_state_dict
    from verify.opencv_reference import default_feed, produce_opencv_reference, require_opencv4

    require_opencv4()
    out = tiny["root"] / "oracle.caffemodel"
    export_caffemodel(tiny["checkpoint"], out, tiny["prototxt"])
    reference = produce_opencv_reference(tiny["prototxt"], out, default_feed(read_prototxt(tiny["prototxt"])),
                                         tiny["root"] / "oracle.h5")
    state_dict, manifest = read_checkpoint(tiny["checkpoint"])
    model = manifest["model"]
    spec = ModelSpec(ResNetConfig(**model["config"]), model["num_classes"], model["bn_eps"])
    with read_activations(reference) as ref:
        result = verify_state_dict(state_dict, spec, ref, source="exported")
    assert result.passed, [row.name for row in result.rows if row.failed][:3]
    assert len(result.rows) > 100


def _bad_prototxt(tiny: dict[str, Path], old: str, new: str, folder: Path) -> Path:
    text = tiny["prototxt"].read_text()
    assert old in text
    path = folder / "bad.prototxt"
    path.write_text(text.replace(old, new, 1))
    return path


@pytest.mark.parametrize("old,new,expected", [
    ('name: "res2a_branch2a"', 'name: "res2a_branch2x"', "res2a_branch2a"),
    ("num_output: 21", "num_output: 20", "num_output 20"),
    ('type: "BatchNorm"', 'type: "Scale"', "layer type Scale"),
    ('name: "fc1_voc12_c0"', 'name: "aspp_c0"', "no ASPP head"),  # not silently taken for fc1_voc12
])
def test_export_caffe_prototxt_not_fitting_is_one_line_exit_2_nothing_written(
    tiny: dict[str, Path], tmp_path: Path, old: str, new: str, expected: str
) -> None:
    prototxt = _bad_prototxt(tiny, old, new, tmp_path)
    out = tmp_path / "out" / "net.caffemodel"
    out.parent.mkdir()
    code, _, err = _run(["export-caffe", "--checkpoint", str(tiny["checkpoint"]), "--prototxt", str(prototxt),
                         "--out", str(out)])
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and expected in err, err
    assert list(out.parent.iterdir()) == []


def test_export_caffe_unwritable_output_is_exit_2(tiny: dict[str, Path]) -> None:
    folder = tiny["root"] / "readonly"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("running as a user who can write anywhere")
        code, _, err = _run(["export-caffe", "--checkpoint", str(tiny["checkpoint"]), "--prototxt",
                             str(tiny["prototxt"]), "--out", str(folder / "net.caffemodel")])
    finally:
        folder.chmod(0o700)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert list(folder.iterdir()) == []


def test_export_caffe_into_a_missing_folder_is_exit_2(tiny: dict[str, Path], tmp_path: Path) -> None:
    code, _, err = _run(["export-caffe", "--checkpoint", str(tiny["checkpoint"]), "--prototxt", str(tiny["prototxt"]),
                         "--out", str(tmp_path / "missing" / "net.caffemodel")])
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "cannot write" in err, err
    assert list(tmp_path.iterdir()) == []


def test_export_caffe_different_bn_eps_is_refused(tiny: dict[str, Path]) -> None:
    text = tiny["prototxt"].read_text()
    prototxt = tiny["root"] / "eps.prototxt"
    prototxt.write_text(text.replace("batch_norm_param {", "batch_norm_param {\n    eps: 0.001"))
    code, _, err = _run(["export-caffe", "--checkpoint", str(tiny["checkpoint"]), "--prototxt", str(prototxt),
                         "--out", str(tiny["root"] / "eps.caffemodel")])
    assert code == 2 and "eps" in err
    assert not (tiny["root"] / "eps.caffemodel").exists()


@pytest.mark.slow
def test_export_caffe_round_trip_full_size(tmp_path: Path) -> None:
    files = write_synthetic_deeplab(tmp_path / "caffe", "msc_test", ResNetConfig.resnet101())
    checkpoint = _convert(files.caffemodel, tmp_path / "checkpoint", files.prototxt)
    out = tmp_path / "exported.caffemodel"
    result = export_caffemodel(checkpoint, out, files.prototxt)
    assert result.layers_written == sum(1 for layer in load_net(weights=files.caffemodel).layers if layer.blobs)
    _assert_identical_state_dicts(checkpoint, _convert(out, tmp_path / "again"))
    assert np.isclose(out.stat().st_size, files.caffemodel.stat().st_size, rtol=0.01)
