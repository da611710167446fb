"""Bad input, class 4 of issue 6: verify must not pass a partial or poisoned reference, and must blame the right file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from bad_input_case import one_error_line, run
from converter.checkpoint import read_manifest
from verify.activations import read_activations, write_activations
from verify.cli import main
from verify_case import TinyCase, tiny_case


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> TinyCase:
    return tiny_case(tmp_path_factory)


def _checkpoint(case: TinyCase, folder: Path) -> Path:
    return Path(shutil.copytree(case.checkpoint, folder))


def _reference(case: TinyCase, path: Path, keep=lambda name: True, change=lambda name, value: value) -> Path:
    with read_activations(case.reference) as ref:
        blobs = {n: change(n, ref.get(n)) for n in ref.order if keep(n)}
        inputs = {n: change(f"inputs/{n}", v) for n, v in ref.inputs.items()}
        return write_activations(path, producer=ref.producer, prototxt=ref.prototxt, inputs=inputs, blobs=blobs)


def test_reference_missing_whole_stages_is_bad_input_unless_allow_partial(case, tmp_path) -> None:
    partial = _reference(case, tmp_path / "partial.h5", keep=lambda n: not n.startswith(("res3", "res4")))
    checkpoint = _checkpoint(case, tmp_path / "ck")
    code, _, err = run(main, "--checkpoint", checkpoint, "--reference", partial)
    line = one_error_line(code, err, names=partial)
    assert "res3" in line and "res4" in line and "--allow-partial" in line
    assert not (checkpoint / "parity").exists()
    code, _, err = run(main, "--checkpoint", checkpoint, "--reference", partial, "--allow-partial")
    assert code == 0, err
    report = json.loads((checkpoint / "parity" / "report.json").read_text())
    assert report["stages_not_compared"] == ["res3", "res4"]
    assert "stages not compared: res3, res4" in (checkpoint / "parity" / "report.md").read_text()
    assert read_manifest(checkpoint)["parity"]["stages_not_compared"] == ["res3", "res4"]


def _poison(name: str, value: np.ndarray, where: str) -> np.ndarray:
    if name == where:
        value = value.copy()
        value.reshape(-1)[0] = np.nan
    return value


@pytest.mark.parametrize("where", ["res2a", "inputs/data"])
def test_nan_in_the_reference_or_its_inputs_is_bad_input_not_a_parity_failure(case, tmp_path, where: str) -> None:
    poisoned = _reference(case, tmp_path / "nan.h5", change=lambda n, v: _poison(n, v, where))
    code, _, err = run(main, "--checkpoint", _checkpoint(case, tmp_path / "ck"), "--reference", poisoned)
    assert where.split("/")[-1] in one_error_line(code, err, names=poisoned)


def test_truncated_reference_names_the_file(case, tmp_path) -> None:
    truncated = tmp_path / "truncated.h5"
    data = case.reference.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    code, _, err = run(main, "--checkpoint", _checkpoint(case, tmp_path / "ck"), "--reference", truncated)
    one_error_line(code, err, names=truncated)


def test_png_given_as_caffemodel_is_blamed_on_the_caffemodel_and_leaves_no_parity_folder(case, tmp_path) -> None:
    png = tmp_path / "photo.caffemodel"
    png.write_bytes(cv2.imencode(".png", np.zeros((8, 8, 3), np.uint8))[1].tobytes())
    checkpoint = _checkpoint(case, tmp_path / "ck")
    code, _, err = run(main, "--checkpoint", checkpoint, "--caffemodel", png, "--prototxt", case.files.prototxt)
    line = one_error_line(code, err, names=png)
    assert str(case.files.prototxt) not in line
    assert not (checkpoint / "parity").exists()
