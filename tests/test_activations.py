"""The reference-activations HDF5 layout: round trip, name escaping, foreign writers, and each layout error."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from converter.errors import CaffeError
from verify.activations import escape_name, read_activations, unescape_name, write_activations


def _write_example(path: Path, **overrides) -> Path:
    rng = np.random.default_rng(0)
    blobs = {"data": rng.standard_normal((1, 3, 4, 5)), "conv1/3x3": rng.standard_normal((1, 2, 4, 5)),
             "50%": rng.standard_normal((1, 2))}
    kwargs = dict(producer="test producer", prototxt='name: "n"\n', inputs={"data": blobs["data"]}, blobs=blobs)
    kwargs.update(overrides)
    return write_activations(path, **kwargs)


@pytest.mark.parametrize("name", ["conv1", "inception_3a/3x3", "a%2Fb", "100%", "%25/%", "a//b"])
def test_name_escaping_round_trips(name: str) -> None:
    escaped = escape_name(name)
    assert "/" not in escaped
    assert unescape_name(escaped) == name


def test_escaping_writes_percent_before_slash() -> None:
    assert escape_name("a/b%c") == "a%2Fb%25c"
    assert unescape_name("a%252F") == "a%2F"


def test_round_trip_keeps_values_order_and_metadata(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    blobs = {"z_first": rng.standard_normal((1, 2, 3, 3)), "inception/out": rng.standard_normal((1, 4)),
             "a_last": rng.standard_normal((2, 1, 1, 1))}
    data = rng.standard_normal((1, 3, 8, 8)).astype(np.float64)
    path = write_activations(tmp_path / "ref.h5", producer="opencv 4.x", prototxt="layer {}\n" * 3,
                             inputs={"data": data}, blobs=blobs)
    with read_activations(path) as ref:
        assert ref.producer == "opencv 4.x"
        assert ref.prototxt == "layer {}\n" * 3
        assert ref.order == ["z_first", "inception/out", "a_last"] == ref.names
        assert ref.inputs["data"].dtype == np.float32
        np.testing.assert_array_equal(ref.inputs["data"], data.astype(np.float32))
        for name, value in blobs.items():
            assert ref.shape(name) == value.shape
            got = ref.get(name)
            assert got.dtype == np.float32
            np.testing.assert_array_equal(got, value.astype(np.float32))
    with h5py.File(path, "r") as f:
        assert "inception%2Fout" in f["blobs"]


def test_explicit_order_overrides_mapping_order(tmp_path: Path) -> None:
    path = _write_example(tmp_path / "ref.h5", order=["50%", "data", "conv1/3x3"])
    with read_activations(path) as ref:
        assert ref.names == ["50%", "data", "conv1/3x3"]


def test_order_must_name_exactly_the_blobs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="exactly once"):
        _write_example(tmp_path / "ref.h5", order=["data", "data", "conv1/3x3"])
    with pytest.raises(ValueError, match="exactly once"):
        _write_example(tmp_path / "ref.h5", order=["data"])
    assert not list(tmp_path.iterdir())


def test_failed_write_leaves_nothing_at_the_path(tmp_path: Path) -> None:
    class Exploding(dict):
        def __getitem__(self, key):
            if key == "b":
                raise RuntimeError("producer died")
            return super().__getitem__(key)

    blobs = Exploding(a=np.zeros((1, 1)), b=np.zeros((1, 1)))
    with pytest.raises(RuntimeError, match="producer died"):
        write_activations(tmp_path / "ref.h5", producer="p", prototxt="", inputs={}, blobs=blobs)
    assert list(tmp_path.iterdir()) == []


def test_failed_write_keeps_the_previous_file(tmp_path: Path) -> None:
    path = _write_example(tmp_path / "ref.h5")
    before = path.read_bytes()
    with pytest.raises(ValueError):
        _write_example(path, order=["nope"])
    assert path.read_bytes() == before


def test_long_prototxt_and_many_names_fit(tmp_path: Path) -> None:
    """A 350 KB prototxt and thousands of names exceed HDF5's 64 KiB compact attribute limit."""
    names = [f"res4b{i}_branch2a_res075" for i in range(4000)]
    blobs = {name: np.zeros((1,), np.float32) for name in names}
    text = "layer { name: 'x' type: 'ReLU' }\n" * 12000
    path = write_activations(tmp_path / "ref.h5", producer="p", prototxt=text, inputs={}, blobs=blobs)
    with read_activations(path) as ref:
        assert ref.names == names
        assert ref.prototxt == text


def test_gzip_compression_reads_back_the_same(tmp_path: Path) -> None:
    value = np.maximum(np.random.default_rng(2).standard_normal((1, 16, 32, 32)), 0).astype(np.float32)
    plain = write_activations(tmp_path / "plain.h5", producer="p", prototxt="", inputs={}, blobs={"relu": value})
    packed = write_activations(tmp_path / "packed.h5", producer="p", prototxt="", inputs={}, blobs={"relu": value},
                               compression="gzip")
    assert packed.stat().st_size < plain.stat().st_size
    with read_activations(packed) as ref:
        np.testing.assert_array_equal(ref.get("relu"), value)


def _foreign_file(path: Path, *, as_bytes: bool, version=1, order=None, blob_dtype="f4") -> Path:
    """A file written with raw h5py calls, as another producer (e.g. the Python 2 Caffe exporter) would."""
    text = (lambda s: s.encode()) if as_bytes else (lambda s: s)
    with h5py.File(path, "w") as f:
        f.attrs["format"] = np.bytes_(b"caffe-activations") if as_bytes else "caffe-activations"
        f.attrs["version"] = np.int32(version) if not isinstance(version, str) else version
        f.attrs["producer"] = text("caffe deeplab-v2 abc123")
        f.attrs["prototxt"] = text('name: "n"')
        f.create_dataset("inputs/data", data=np.ones((1, 3, 2, 2), np.float32))
        f.create_dataset("blobs/data", data=np.ones((1, 3, 2, 2), np.float32))
        f.create_dataset("blobs/conv1%2F1x1", data=np.arange(4, dtype=blob_dtype).reshape(1, 1, 2, 2))
        names = ["data", "conv1/1x1"] if order is None else order
        if as_bytes:
            f["blobs"].attrs["order"] = np.array([n.encode() for n in names], dtype="S")
        else:
            f["blobs"].attrs["order"] = np.array(names, dtype=h5py.string_dtype())
    return path


@pytest.mark.parametrize("as_bytes", [True, False], ids=["bytes_attrs", "str_attrs"])
def test_file_written_by_raw_h5py_reads(tmp_path: Path, as_bytes: bool) -> None:
    with read_activations(_foreign_file(tmp_path / "foreign.h5", as_bytes=as_bytes)) as ref:
        assert ref.producer == "caffe deeplab-v2 abc123"
        assert ref.prototxt == 'name: "n"'
        assert ref.names == ["data", "conv1/1x1"]
        assert list(ref.inputs) == ["data"]
        np.testing.assert_array_equal(ref.get("conv1/1x1").ravel(), [0, 1, 2, 3])


def test_float64_blobs_from_another_writer_read_as_float32(tmp_path: Path) -> None:
    with read_activations(_foreign_file(tmp_path / "f.h5", as_bytes=False, blob_dtype="f8")) as ref:
        assert ref.get("conv1/1x1").dtype == np.float32


def _expect_error(path: Path, match: str) -> None:
    with pytest.raises(CaffeError, match=match) as info:
        read_activations(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message


def test_missing_file_is_named(tmp_path: Path) -> None:
    _expect_error(tmp_path / "absent.h5", "no such")


def test_non_hdf5_file_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "ref.h5"
    path.write_text("not hdf5")
    _expect_error(path, "not an HDF5 file")


def test_missing_format_attribute_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "ref.h5"
    with h5py.File(path, "w") as f:
        f.create_group("blobs")
    _expect_error(path, "'format' is missing")


def test_other_format_is_rejected(tmp_path: Path) -> None:
    path = _write_example(tmp_path / "ref.h5")
    with h5py.File(path, "a") as f:
        f.attrs["format"] = "keras-weights"
    _expect_error(path, "format is 'keras-weights'")


@pytest.mark.parametrize("version", [2, 0, "1"])
def test_unsupported_version_is_rejected(tmp_path: Path, version) -> None:
    _expect_error(_foreign_file(tmp_path / "f.h5", as_bytes=False, version=version), "unsupported version")


@pytest.mark.parametrize("group", ["inputs", "blobs"])
def test_missing_group_is_rejected(tmp_path: Path, group: str) -> None:
    path = _write_example(tmp_path / "ref.h5")
    with h5py.File(path, "a") as f:
        del f[group]
    _expect_error(path, f"group '/{group}' is missing")


def test_integer_blob_is_rejected(tmp_path: Path) -> None:
    _expect_error(_foreign_file(tmp_path / "f.h5", as_bytes=False, blob_dtype="i4"), "not a floating-point dataset")


def test_order_naming_a_missing_dataset_is_rejected(tmp_path: Path) -> None:
    path = _foreign_file(tmp_path / "f.h5", as_bytes=True, order=["data", "conv1/1x1", "fc_fusion"])
    _expect_error(path, "lists blob 'fc_fusion' but '/blobs' has no such dataset")


def test_dataset_missing_from_order_is_rejected(tmp_path: Path) -> None:
    _expect_error(_foreign_file(tmp_path / "f.h5", as_bytes=False, order=["data"]), "not listed")


def test_missing_order_attribute_is_rejected(tmp_path: Path) -> None:
    path = _write_example(tmp_path / "ref.h5")
    with h5py.File(path, "a") as f:
        del f["blobs"].attrs["order"]
    _expect_error(path, "'order' on '/blobs' is missing")


def test_unknown_blob_lookup_names_the_blob_and_file(tmp_path: Path) -> None:
    path = _write_example(tmp_path / "ref.h5")
    with read_activations(path) as ref:
        assert "res5c" not in ref
        with pytest.raises(CaffeError, match="blob 'res5c' is not in the reference") as info:
            ref.get("res5c")
        assert str(path) in str(info.value)


def test_blobs_are_read_on_demand(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write_example(tmp_path / "ref.h5")
    reads: list[str] = []
    original = h5py.Dataset.__getitem__

    def counting(self, key):
        reads.append(self.name)
        return original(self, key)

    monkeypatch.setattr(h5py.Dataset, "__getitem__", counting)
    with read_activations(path) as ref:
        assert [r for r in reads if r.startswith("/blobs/")] == []
        ref.get("conv1/3x3")
        assert [r for r in reads if r.startswith("/blobs/")] == ["/blobs/conv1%2F3x3"]
