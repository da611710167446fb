"""`python -m verify`: exit codes, report files, the manifest's verdict, and every kind of bad input."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import h5py
import pytest
import torch

from converter.checkpoint import read_checkpoint, read_manifest, update_manifest, write_checkpoint
from converter.cli import main as convert_main
from verify.activations import read_activations, write_activations
from verify.cli import main
from verify.verdict import describe_parity
from verify_case import TinyCase, tiny_case


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> TinyCase:
    return tiny_case(tmp_path_factory)


def _run(*argv: str | Path) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def _copy_checkpoint(case: TinyCase, dest: Path) -> Path:
    shutil.copytree(case.checkpoint, dest)
    return dest


def test_reference_alone_verifies_reports_and_records_pass(case: TinyCase, tmp_path: Path) -> None:
    checkpoint = _copy_checkpoint(case, tmp_path / "ck")
    code, out, err = _run("--checkpoint", checkpoint, "--reference", case.reference)
    assert code == 0, err
    assert "parity PASS against opencv" in out
    report = checkpoint / "parity"
    assert {"report.md", "report.json", "errors.png"} <= {p.name for p in report.iterdir()}
    data = json.loads((report / "report.json").read_text())
    assert data["verdict"] == "pass" and data["first_diverging"] is None
    parity = read_manifest(checkpoint)["parity"]
    assert parity["verdict"] == "pass" and parity["scope"] == "full"
    assert parity["reference_producer"].startswith("opencv 4.")
    assert len(parity["reference_sha256"]) == 64 and parity["worst_blob"]["name"]
    assert describe_parity(read_manifest(checkpoint)).startswith("checkpoint verified: PASS against opencv 4.")
    read_checkpoint(checkpoint)  # the weights still match their recorded hashes


def test_without_reference_the_opencv_reference_is_made_from_the_manifests_sources(case: TinyCase, tmp_path) -> None:
    checkpoint = _copy_checkpoint(case, tmp_path / "ck")
    code, out, err = _run("--checkpoint", checkpoint, "--report-dir", tmp_path / "rep")
    assert code == 0, err
    with read_activations(tmp_path / "rep" / "reference_opencv.h5") as ref:
        assert ref.inputs["data"].shape == (1, 3, 65, 67)
        assert "fc1_interp" in ref and "conv1" in ref  # every top of the test net
    assert read_manifest(checkpoint)["parity"]["verdict"] == "pass"


def test_broken_checkpoint_exits_1_names_the_blob_and_records_fail(case: TinyCase, tmp_path: Path) -> None:
    state_dict, manifest = read_checkpoint(case.checkpoint)
    state_dict["backbone.bn1.running_var"] = state_dict["backbone.bn1.running_var"] * case.bn_factors["bn_conv1"]
    write_checkpoint(tmp_path / "ck", state_dict, manifest)
    code, out, _ = _run("--checkpoint", tmp_path / "ck", "--reference", case.reference)
    assert code == 1
    assert "first diverging blob 'conv1'" in out
    parity = read_manifest(tmp_path / "ck")["parity"]
    assert parity["verdict"] == "fail" and parity["first_diverging_blob"]["name"] == "conv1"
    assert "FAILED" in describe_parity(read_manifest(tmp_path / "ck"))


def test_surgery_checkpoint_is_verified_on_its_backbone_only(case: TinyCase, tmp_path: Path) -> None:
    with contextlib.redirect_stdout(io.StringIO()):
        assert convert_main(["convert", "--caffemodel", str(case.files.caffemodel), "--out", str(tmp_path / "ck"),
                             "--classes", "5", "-q"]) == 0
    code, out, err = _run("--checkpoint", tmp_path / "ck", "--reference", case.reference)
    assert code == 0, err
    parity = read_manifest(tmp_path / "ck")["parity"]
    assert parity["scope"] == "backbone"
    rows = json.loads((tmp_path / "ck" / "parity" / "report.json").read_text())["blobs"]
    status = {row["name"]: row["status"] for row in rows}
    assert status["fc1_voc12"] == "skipped" and status["fc_fusion"] == "skipped" and status["res5b"] == "pass"
    assert describe_parity(read_manifest(tmp_path / "ck")).endswith("(backbone)")


def _bad(argv: list[str | Path]) -> str:
    code, out, err = _run(*argv)
    assert code == 2, out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    return lines[0]


def _rewrite_reference(case: TinyCase, path: Path, **changes) -> Path:
    with read_activations(case.reference) as ref:
        blobs = {n: ref.get(n) for n in ref.order}
        args = {"producer": ref.producer, "prototxt": ref.prototxt, "inputs": ref.inputs, "blobs": blobs}
    for key, value in changes.items():
        if key in args:
            args[key] = value
        else:
            blobs[key] = value
    return write_activations(path, **args)


def test_reference_of_another_format_or_version_is_bad_input(case: TinyCase, tmp_path: Path) -> None:
    other = tmp_path / "other.h5"
    shutil.copy(case.reference, other)
    with h5py.File(other, "r+") as f:
        f.attrs["format"] = "keras-weights"
    assert "keras-weights" in _bad(["--checkpoint", case.checkpoint, "--reference", other])
    with h5py.File(other, "r+") as f:
        f.attrs["format"] = "caffe-activations"
        f.attrs["version"] = 2
    assert "unsupported version" in _bad(["--checkpoint", case.checkpoint, "--reference", other])
    text = tmp_path / "not.h5"
    text.write_text("hello")
    assert "not an HDF5 file" in _bad(["--checkpoint", case.checkpoint, "--reference", text])


def test_reference_without_any_mapped_blob_is_bad_input(case: TinyCase, tmp_path: Path) -> None:
    with read_activations(case.reference) as ref:
        data = ref.inputs["data"]
    empty = write_activations(tmp_path / "none.h5", producer="x", prototxt="", inputs={"data": data},
                              blobs={"label": data[:, :1], "accuracy": data[:, :1, :1, :1]})
    message = _bad(["--checkpoint", case.checkpoint, "--reference", empty])
    assert "none of the blobs" in message and "label" in message


def test_missing_blobs_are_listed_as_not_in_reference(case: TinyCase, tmp_path: Path) -> None:
    with read_activations(case.reference) as ref:
        keep = [n for n in ref.order if n not in ("res3a", "res3a_res05")]
        subset = write_activations(tmp_path / "subset.h5", producer=ref.producer, prototxt=ref.prototxt,
                                   inputs=ref.inputs, blobs={n: ref.get(n) for n in keep})
    checkpoint = _copy_checkpoint(case, tmp_path / "ck")
    code, _, err = _run("--checkpoint", checkpoint, "--reference", subset)
    assert code == 0, err
    data = json.loads((checkpoint / "parity" / "report.json").read_text())
    assert data["not_in_reference"] == ["res3a", "res3a_res05"]
    assert "not in reference: res3a, res3a_res05" in (checkpoint / "parity" / "report.md").read_text()
    assert "not in the reference: nope" in _bad(["--checkpoint", checkpoint, "--reference", subset, "--blobs", "conv1,nope"])


def test_shape_mismatch_names_the_blob(case: TinyCase, tmp_path: Path) -> None:
    with read_activations(case.reference) as ref:
        pool1 = ref.get("pool1")
    wrong = _rewrite_reference(case, tmp_path / "wrong.h5", pool1=pool1[..., :-1])  # floor-rounded pool1
    message = _bad(["--checkpoint", case.checkpoint, "--reference", wrong])
    assert "'pool1'" in message and "(1, 8, 17, 17)" in message and "(1, 8, 17, 18)" in message


def test_checkpoint_that_does_not_fit_the_model_is_named(case: TinyCase, tmp_path: Path) -> None:
    checkpoint = _copy_checkpoint(case, tmp_path / "ck")
    model = dict(read_manifest(checkpoint)["model"])
    model["config"] = {**model["config"], "blocks": [2, 2, 3, 2]}
    update_manifest(checkpoint, "model", model)
    message = _bad(["--checkpoint", checkpoint, "--reference", case.reference])
    assert "does not fit the model" in message and "backbone.layer3.2.conv1.weight" in message
    model["config"]["blocks"] = [2, 2, 2, 2]
    model["num_classes"] = 7
    update_manifest(checkpoint, "model", model)
    assert "aspp.branches.0.weight (21, 128, 3, 3) != model (7, 128, 3, 3)" in _bad(
        ["--checkpoint", checkpoint, "--reference", case.reference])


def test_other_bad_invocations_exit_2(case: TinyCase, tmp_path: Path) -> None:
    assert "no manifest.json" in _bad(["--checkpoint", tmp_path, "--reference", case.reference])
    assert "no such reference" in _bad(["--checkpoint", case.checkpoint, "--reference", tmp_path / "x.h5"])
    assert "--reference brings its own input" in _bad(
        ["--checkpoint", case.checkpoint, "--reference", case.reference, "--image", tmp_path / "a.png"])
    assert "not a device name" in _bad(["--checkpoint", case.checkpoint, "--reference", case.reference,
                                        "--device", "gpu0"])
    if not torch.cuda.is_available():
        assert "no CUDA device" in _bad(["--checkpoint", case.checkpoint, "--reference", case.reference,
                                         "--device", "cuda"])


def test_step_input_of_a_wrong_shape_is_named_even_when_not_compared(case: TinyCase, tmp_path: Path) -> None:
    with read_activations(case.reference) as ref:
        branch2a = ref.get("res2a_branch2a")
    wrong = _rewrite_reference(case, tmp_path / "wrong.h5", res2a_branch2a=branch2a[:, :2])
    message = _bad(["--checkpoint", case.checkpoint, "--reference", wrong, "--blobs", "res2a_branch2b"])
    assert "res2a_branch2a (1, 2, 17, 18)" in message and "'res2a_branch2b'" in message


def test_sources_recorded_in_the_manifest_are_found_from_another_folder(
    case: TinyCase, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpoint = _copy_checkpoint(case, tmp_path / "ck")
    monkeypatch.chdir(tmp_path)  # the conversion ran elsewhere: recorded paths are absolute
    code, _, err = _run("--checkpoint", "ck", "--report-dir", tmp_path / "rep")
    assert code == 0, err


def test_a_source_changed_since_conversion_is_refused_before_any_reference(case: TinyCase, tmp_path: Path) -> None:
    checkpoint = _copy_checkpoint(case, tmp_path / "ck")
    source = tmp_path / "changed.caffemodel"
    source.write_bytes(case.files.caffemodel.read_bytes() + b"\x00")
    manifest = read_manifest(checkpoint)
    update_manifest(checkpoint, "inputs", {**manifest["inputs"], "caffemodel": {
        **manifest["inputs"]["caffemodel"], "path": str(source)}})
    code, _, err = _run("--checkpoint", checkpoint, "--report-dir", tmp_path / "rep")
    assert code == 2 and "changed since the checkpoint was converted" in err
    assert not (tmp_path / "rep").exists()


def test_bad_device_and_unwritable_report_folder_are_bad_input_not_parity_failures(
    case: TinyCase, tmp_path: Path
) -> None:
    checkpoint = _copy_checkpoint(case, tmp_path / "ck")
    code, _, err = _run("--checkpoint", checkpoint, "--device", "bogus", "--report-dir", tmp_path / "rep")
    assert code == 2 and "--device 'bogus'" in err and not (tmp_path / "rep").exists()
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code, _, err = _run("--checkpoint", checkpoint, "--reference", case.reference, "--report-dir", blocker / "rep")
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1
