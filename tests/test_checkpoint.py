"""Checkpoint folders: loadable formats, a manifest that vouches for them, atomic writes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

from converter import checkpoint
from converter.checkpoint import (
    new_manifest,
    read_checkpoint,
    sha256_file,
    update_manifest,
    write_checkpoint,
)
from converter.errors import CaffeError
from converter.loading import build_model, load_model
from models.deeplab import DeepLabV2, DeepLabV2MSC, ResNetConfig

CONFIG = ResNetConfig.tiny()


@pytest.fixture()
def state_dict() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return dict(DeepLabV2(num_classes=21, config=CONFIG).state_dict())


def _manifest() -> dict:
    return new_manifest(
        inputs={"caffemodel": None, "prototxt": None},
        prototxt_text=None,
        model={
            "config": {"blocks": list(CONFIG.blocks), "stem_width": CONFIG.stem_width, "widths": list(CONFIG.widths)},
            "num_classes": 21,
            "bn_eps": 1e-3,
        },
        surgery=None,
        coverage=None,
    )


def _snapshot(folder: Path) -> dict[str, str]:
    return {path.name: sha256_file(path) for path in sorted(folder.iterdir())}


def test_pth_loads_with_weights_only_and_equals_safetensors(tmp_path: Path, state_dict: dict) -> None:
    paths = write_checkpoint(tmp_path / "ckpt", state_dict, _manifest())
    from_pth = torch.load(paths.pth, weights_only=True)
    from_safetensors = safetensors.torch.load_file(str(paths.safetensors))
    assert from_pth.keys() == from_safetensors.keys() == state_dict.keys()
    assert all(torch.equal(from_pth[k], state_dict[k]) and torch.equal(from_safetensors[k], state_dict[k])
               for k in state_dict)


def test_manifest_records_format_files_and_versions(tmp_path: Path, state_dict: dict) -> None:
    paths = write_checkpoint(tmp_path, state_dict, _manifest())
    manifest = json.loads(paths.manifest.read_text())
    assert manifest["format"] == "caffe2torch-checkpoint" and manifest["version"] == 1
    assert manifest["model"]["arch"] == "deeplabv2_resnet_msc" and manifest["parity"] is None
    assert manifest["files"] == {"model.pth": sha256_file(paths.pth), "model.safetensors": sha256_file(paths.safetensors)}
    assert manifest["versions"]["torch"] and manifest["versions"]["python"]
    assert manifest["created"].endswith("+00:00")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "model.pth", "model.safetensors"]


@pytest.mark.parametrize("source", ["folder", "model.pth", "model.safetensors"])
def test_read_checkpoint_accepts_folder_or_either_file(tmp_path: Path, state_dict: dict, source: str) -> None:
    write_checkpoint(tmp_path, state_dict, _manifest())
    loaded, manifest = read_checkpoint(tmp_path if source == "folder" else tmp_path / source)
    assert manifest["model"]["num_classes"] == 21
    assert all(torch.equal(loaded[k], state_dict[k]) for k in state_dict)


def test_read_checkpoint_rejects_a_file_that_does_not_match_its_manifest(tmp_path: Path, state_dict: dict) -> None:
    paths = write_checkpoint(tmp_path, state_dict, _manifest())
    torch.save({"x": torch.zeros(1)}, paths.pth)
    with pytest.raises(CaffeError, match="sha256"):
        read_checkpoint(paths.pth)


def test_failed_write_leaves_nothing_and_keeps_the_previous_checkpoint(
    tmp_path: Path, state_dict: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    existing = tmp_path / "existing"
    write_checkpoint(existing, state_dict, _manifest())
    before = _snapshot(existing)

    def fail_midway(tensors: dict, filename: str, metadata: dict | None = None) -> None:
        Path(filename).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.safetensors.torch, "save_file", fail_midway)
    changed = {key: value + 1 for key, value in state_dict.items()}
    with pytest.raises(CaffeError, match="No space left on device"):
        write_checkpoint(existing, changed, _manifest())
    assert _snapshot(existing) == before

    fresh = tmp_path / "new" / "nested"
    with pytest.raises(CaffeError):
        write_checkpoint(fresh, changed, _manifest())
    assert not (tmp_path / "new").exists()


def test_unwritable_output_folder_is_named(tmp_path: Path, state_dict: dict) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(CaffeError, match="a_file/out: cannot create the output folder"):
        write_checkpoint(blocker / "out", state_dict, _manifest())


def test_update_manifest_sets_a_field_atomically(tmp_path: Path, state_dict: dict, monkeypatch) -> None:
    write_checkpoint(tmp_path, state_dict, _manifest())
    update_manifest(tmp_path, "parity", {"verdict": "pass"})
    assert json.loads((tmp_path / "manifest.json").read_text())["parity"] == {"verdict": "pass"}
    before = _snapshot(tmp_path)

    def broken_dumps(*args, **kwargs):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(checkpoint.json, "dumps", broken_dumps)
    with pytest.raises(CaffeError, match="Input/output error"):
        update_manifest(tmp_path, "parity", {"verdict": "fail"})
    assert _snapshot(tmp_path) == before


def test_legacy_export_is_listed_and_a_later_plain_write_removes_it(tmp_path: Path, state_dict: dict) -> None:
    from converter.deeplab.legacy_port import to_legacy

    paths = write_checkpoint(tmp_path, state_dict, _manifest(), legacy_state_dict=to_legacy(state_dict))
    assert paths.legacy is not None and paths.legacy.is_file()
    assert "legacy_model.pth" in json.loads(paths.manifest.read_text())["files"]
    write_checkpoint(tmp_path, state_dict, _manifest())
    assert not (tmp_path / "legacy_model.pth").exists()


def test_model_builds_from_the_manifest_with_its_eps(tmp_path: Path, state_dict: dict) -> None:
    write_checkpoint(tmp_path, state_dict, _manifest())
    model, manifest = load_model(tmp_path)
    assert isinstance(model, DeepLabV2MSC) and not model.training
    single = build_model(manifest, state_dict, msc=False)
    assert isinstance(single, DeepLabV2)
    eps = {m.eps for m in single.modules() if hasattr(m, "running_var")}
    assert eps == {1e-3}


@pytest.mark.parametrize("size", [0, 1, 4096, 3 * 4096 + 5])
def test_sha256_file_matches_hashlib_across_mapped_steps(tmp_path: Path, size: int) -> None:
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    (tmp_path / "f").write_bytes(data)
    # 4 KiB steps: several steps, each released after hashing
    assert checkpoint.sha256_file(tmp_path / "f", chunk=4096) == hashlib.sha256(data).hexdigest()
