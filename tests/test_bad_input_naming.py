"""Bad input, class 5 of issue 6: the error names the file and the layer that are at fault."""

from __future__ import annotations

import shutil

import h5py
import numpy as np
import pytest

from bad_input_case import edit_net_text, layer, one_error_line, run, seed_files
from converter.cli import main
from fuzz.seeds import CAFFEMODEL, HDF5, PROTOTXT, Seeds


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> Seeds:
    return seed_files(tmp_path_factory)


def _convert(seeds: Seeds, tmp_path, *, prototxt=None, weights=None) -> tuple[int, str]:
    code, _, err = run(main, "convert", "-q", "--caffemodel", weights or seeds.path(CAFFEMODEL), "--prototxt",
                       prototxt or seeds.path(PROTOTXT), "--out", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    return code, err


def test_unknown_layer_type_in_the_prototxt_names_the_prototxt_and_the_layer(seeds, tmp_path) -> None:
    prototxt = edit_net_text(seeds.path(PROTOTXT), tmp_path / "p.prototxt",
                             lambda net: setattr(layer(net, "res2a_branch2b"), "type", "Nope"))
    code, err = _convert(seeds, tmp_path, prototxt=prototxt)
    line = one_error_line(code, err, names=prototxt, layer="res2a_branch2b")
    assert "Nope" in line and str(seeds.path(CAFFEMODEL)) not in line


def test_bad_eps_in_the_prototxt_names_the_prototxt(seeds, tmp_path) -> None:
    def edit(net) -> None:
        layer(net, "bn2a_branch2a").batch_norm_param.eps = -1.0

    prototxt = edit_net_text(seeds.path(PROTOTXT), tmp_path / "p.prototxt", edit)
    code, err = _convert(seeds, tmp_path, prototxt=prototxt)
    line = one_error_line(code, err, names=prototxt, layer="bn2a_branch2a")
    assert str(seeds.path(CAFFEMODEL)) not in line


def test_hdf5_dataset_of_the_wrong_shape_names_its_own_layer(seeds, tmp_path) -> None:
    weights = tmp_path / "w.caffemodel.h5"
    shutil.copy(seeds.path(HDF5), weights)
    with h5py.File(weights, "r+") as h5:
        shape = h5["data/res3a_branch2b/0"].shape
        del h5["data/res3a_branch2b/0"]
        h5["data/res3a_branch2b/0"] = np.zeros((shape[0] + 1, *shape[1:]), np.float32)
    code, err = _convert(seeds, tmp_path, weights=weights)
    one_error_line(code, err, names=weights, layer="res3a_branch2b")


def test_duplicate_layer_name_is_reported_as_a_duplicate(seeds, tmp_path) -> None:
    def edit(net) -> None:
        layer(net, "res2a_branch2b").name = "res2a_branch2a"

    prototxt = edit_net_text(seeds.path(PROTOTXT), tmp_path / "p.prototxt", edit)
    code, err = _convert(seeds, tmp_path, prototxt=prototxt)
    assert "duplicate" in one_error_line(code, err, names=prototxt, layer="res2a_branch2a")
