"""Bad input, class 6 of issue 6: the output folder is one unit, replaced in one step or not at all."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from bad_input_case import one_error_line, run, seed_files
from converter.atomic import replace_folder
from converter.checkpoint import read_manifest, sha256_file
from converter.cli import main
from converter.errors import CaffeError
from fuzz.seeds import CAFFEMODEL, PROTOTXT, Seeds


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> Seeds:
    return seed_files(tmp_path_factory)


def _convert(seeds: Seeds, out: Path, *extra: object) -> tuple[int, str]:
    code, _, err = run(main, "convert", "-q", "--caffemodel", seeds.path(CAFFEMODEL), "--out", out, *extra)
    return code, err


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def test_out_holding_a_users_files_is_refused_and_left_untouched(seeds, tmp_path) -> None:
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"mine")
    code, err = _convert(seeds, out)
    assert "manifest" in one_error_line(code, err, names=out)
    assert _snapshot(out) == {"holiday.jpg": sha256_file(out / "holiday.jpg")}


def test_out_that_is_a_file_or_empty_is_refused(seeds, tmp_path) -> None:
    code, err = _convert(seeds, "")
    one_error_line(code, err, names="--out")
    target = tmp_path / "file"
    target.write_text("x")
    code, err = _convert(seeds, target)
    one_error_line(code, err, names=target)
    assert target.read_text() == "x"


def test_reconvert_replaces_the_whole_set_and_drops_a_stale_parity_report(seeds, tmp_path) -> None:
    out = tmp_path / "out"
    assert _convert(seeds, out, "--export-legacy")[0] == 0
    (out / "parity").mkdir()
    (out / "parity" / "report.md").write_text("PASS")
    code, err = _convert(seeds, out, "--prototxt", seeds.path(PROTOTXT))
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.pth", "model.safetensors"]
    assert read_manifest(out)["parity"] is None
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging folder left beside it


def test_failed_reconvert_leaves_the_earlier_set_exactly_as_it_was(seeds, tmp_path) -> None:
    out = tmp_path / "out"
    assert _convert(seeds, out)[0] == 0
    before = _snapshot(out)
    code, err = _convert(seeds, out, "--classes", "0")
    one_error_line(code, err, names="--classes")
    assert _snapshot(out) == before


def test_a_build_failing_midway_leaves_the_old_folder_and_no_staging(tmp_path) -> None:
    out = tmp_path / "set"

    def old_set(staging: Path) -> None:
        (staging / "a").write_text("old a")
        (staging / "b").write_text("old b")

    replace_folder(out, old_set, owned=lambda folder: True)

    def half_then_fail(staging: Path) -> None:
        (staging / "a").write_text("new a")
        raise OSError(28, "No space left on device")

    with pytest.raises(CaffeError, match="No space left on device"):
        replace_folder(out, half_then_fail, owned=lambda folder: True)
    assert {p.name: p.read_text() for p in out.iterdir()} == {"a": "old a", "b": "old b"}
    assert [p.name for p in tmp_path.iterdir()] == ["set"]


def test_replacing_exchanges_the_folders_in_one_step(tmp_path) -> None:
    out = tmp_path / "set"
    replace_folder(out, lambda staging: (staging / "old").write_text("1"), owned=lambda folder: True)
    inode_before = out.stat().st_ino
    replace_folder(out, lambda staging: (staging / "new").write_text("2"), owned=lambda folder: True)
    assert [p.name for p in out.iterdir()] == ["new"]
    assert out.stat().st_ino != inode_before  # the new folder itself took the name, not files moved into the old one


def test_all_checkpoint_files_follow_the_umask(seeds, tmp_path) -> None:
    old = os.umask(0o027)
    try:
        assert _convert(seeds, tmp_path / "out")[0] == 0
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "out").iterdir()}
    assert set(modes.values()) == {0o640}, modes
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o750
