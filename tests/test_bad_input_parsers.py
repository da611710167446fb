"""Bad input, class 3 of issue 6: what used to end in a traceback ends in one line and exit code 2.

Hostile bytes at each parser (prototxt text, protobuf wire, HDF5), out-of-range arguments, a hand-edited
manifest, a corrupted model.safetensors, a write that fails midway (as on a full disk) and absurd sizes.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from bad_input_case import edit_net_binary, layer, one_error_line, run, seed_files
from converter.cli import main as convert_main
from converter.errors import CaffeError
from converter.loading import load_model
from fuzz.seeds import CAFFEMODEL, CHECKPOINT_DIR, HDF5, PROTOTXT, REFERENCE, Seeds
from verify.cli import main as verify_main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> Seeds:
    return seed_files(tmp_path_factory)


def _convert(*argv: object) -> tuple[int, str, str]:
    return run(convert_main, "convert", "-q", *argv)


def test_deeply_nested_prototxt_is_one_line_not_a_recursion_error(seeds, tmp_path) -> None:
    prototxt = tmp_path / "deep.prototxt"
    prototxt.write_text(seeds.path(PROTOTXT).read_text() + "thing { " * 5000 + "}" * 5000 + "\n")
    code, _, err = _convert("--caffemodel", seeds.path(CAFFEMODEL), "--prototxt", prototxt, "--out", tmp_path / "o")
    assert "nest" in one_error_line(code, err, names=prototxt)


def test_protobuf_group_in_an_unknown_field_is_bad_input_naming_the_layer(seeds, tmp_path) -> None:
    group = b"\xbb\x3e\x08\x01\xbc\x3e"  # field 999, wire type 3 (start group) .. 4 (end group)

    def edit(net) -> None:
        conv = layer(net, "conv1")
        conv.ParseFromString(conv.SerializeToString() + group)

    caffemodel = edit_net_binary(seeds.path(CAFFEMODEL), tmp_path / "g.caffemodel", edit)
    code, _, err = _convert("--caffemodel", caffemodel, "--out", tmp_path / "o")
    one_error_line(code, err, names=caffemodel, layer="conv1")
    assert not (tmp_path / "o").exists()


def test_blob_whose_shape_product_overflows_is_bad_input_naming_the_layer(seeds, tmp_path) -> None:
    def edit(net) -> None:
        shape = layer(net, "conv1").blobs[0].shape
        del shape.dim[:]
        shape.dim.extend([2**40, 2**40, 2**40])

    caffemodel = edit_net_binary(seeds.path(CAFFEMODEL), tmp_path / "big.caffemodel", edit)
    code, _, err = _convert("--caffemodel", caffemodel, "--out", tmp_path / "o")
    one_error_line(code, err, names=caffemodel, layer="conv1")


def _corrupt_first(data: bytes, signature: bytes) -> bytes:
    at = data.index(signature)
    return data[:at] + b"XXXX" + data[at + 4 :]


@pytest.mark.parametrize("signature", [b"SNOD", b"TREE", b"HEAP"])
def test_corrupted_hdf5_internals_are_one_line(seeds, tmp_path, signature: bytes) -> None:
    weights = tmp_path / "bad.caffemodel.h5"
    weights.write_bytes(_corrupt_first(seeds.path(HDF5).read_bytes(), signature))
    code, _, err = _convert("--caffemodel", weights, "--prototxt", seeds.path(PROTOTXT), "--out", tmp_path / "o")
    one_error_line(code, err, names=weights)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("what", ["scalar", "dangling soft link", "integer"])
def test_odd_hdf5_dataset_is_bad_input_naming_its_layer(seeds, tmp_path, what: str) -> None:
    weights = tmp_path / "odd.caffemodel.h5"
    shutil.copy(seeds.path(HDF5), weights)
    with h5py.File(weights, "r+") as h5:
        del h5["data/res2a_branch2a/0"]
        if what == "scalar":
            h5["data/res2a_branch2a/0"] = np.float32(1.0)
        elif what == "integer":
            h5["data/res2a_branch2a/0"] = np.ones((2, 8, 1, 1), np.int32)
        else:
            h5["data/res2a_branch2a/0"] = h5py.SoftLink("/nowhere")
    code, _, err = _convert("--caffemodel", weights, "--prototxt", seeds.path(PROTOTXT), "--out", tmp_path / "o")
    one_error_line(code, err, names=weights, layer="res2a_branch2a")


@pytest.mark.parametrize("argument", [("--classes", "2147483648"), ("--classes", "0"), ("--seed", str(2**70)),
                                      ("--seed", "-1")])
def test_out_of_range_classes_and_seed_are_one_line(seeds, tmp_path, argument: tuple[str, str]) -> None:
    code, _, err = _convert("--caffemodel", seeds.path(CAFFEMODEL), "--out", tmp_path / "o", *argument)
    one_error_line(code, err, names=argument[0])
    assert not (tmp_path / "o").exists()


def _edited_checkpoint(seeds: Seeds, folder: Path, edit) -> Path:
    shutil.copytree(seeds.path(CHECKPOINT_DIR), folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    edit(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


@pytest.mark.parametrize("edit", [
    lambda m: m["model"]["config"].update(blocks="x"),
    lambda m: m["model"]["config"].update(depth=50),
    lambda m: m["model"].update(num_classes=-3),
    lambda m: m["model"].update(bn_eps="small"),
    lambda m: m.update(files=[]),
    lambda m: m["model"]["config"].update(widths=[2**40, 4, 4, 8]),
], ids=["blocks-text", "extra-config-key", "negative-classes", "eps-text", "files-list", "absurd-width"])
def test_hand_edited_manifest_is_one_line_naming_it(seeds, tmp_path, edit) -> None:
    folder = _edited_checkpoint(seeds, tmp_path / "ck", edit)
    with pytest.raises(CaffeError, match="manifest.json"):
        load_model(folder)
    code, _, err = run(verify_main, "--checkpoint", folder, "--reference", seeds.path(REFERENCE))
    one_error_line(code, err, names=folder / "manifest.json")


def test_corrupted_safetensors_is_one_line_naming_it(seeds, tmp_path) -> None:
    folder = tmp_path / "ck"
    shutil.copytree(seeds.path(CHECKPOINT_DIR), folder)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(struct.pack("<Q", len(data)) + data[8:])  # header length past the end of the file
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["model.safetensors"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CaffeError, match="model.safetensors"):
        load_model(folder)


def test_a_write_failing_midway_like_a_full_disk_is_one_line_and_leaves_nothing(seeds, tmp_path) -> None:
    # RLIMIT_FSIZE makes the checkpoint writes fail partway with EFBIG, the same OSError path as ENOSPC.
    script = (
        "import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
        "resource.setrlimit(resource.RLIMIT_FSIZE, (60000, 60000)); "
        "from converter.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-c", script, "convert", "-q", "--caffemodel",
                             str(seeds.path(CAFFEMODEL)), "--out", str(out)], capture_output=True, text=True,
                            cwd=REPO, timeout=120)
    one_error_line(result.returncode, result.stderr, names=out)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name != "out"]


def test_absurd_input_dims_in_a_reference_are_refused_before_any_allocation(seeds, tmp_path) -> None:
    reference = tmp_path / "absurd.h5"
    shutil.copy(seeds.path(REFERENCE), reference)
    with h5py.File(reference, "r+") as h5:
        del h5["inputs/data"]
        h5.create_dataset("inputs/data", shape=(1, 3, 2**17, 2**17), dtype=np.float32, chunks=(1, 1, 64, 64))
    code, _, err = run(verify_main, "--checkpoint", seeds.path(CHECKPOINT_DIR), "--reference", reference)
    assert "inputs/data" in one_error_line(code, err, names=reference)


def test_absurd_input_dims_in_a_prototxt_are_refused_before_any_allocation(seeds, tmp_path) -> None:
    folder = tmp_path / "ck"
    shutil.copytree(seeds.path(CHECKPOINT_DIR), folder)
    prototxt = tmp_path / "huge.prototxt"
    text = seeds.path(PROTOTXT).read_text()
    prototxt.write_text(text.replace("dim: 33", "dim: 200000"))
    code, _, err = run(verify_main, "--checkpoint", folder, "--prototxt", prototxt)
    one_error_line(code, err, names=prototxt)
    assert not (folder / "parity").exists()
