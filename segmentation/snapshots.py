"""Training snapshots: OUT/iter_<N>/ checkpoint folders with the trainer state, and what they record of the parent."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from converter.atomic import replace_folder
from converter.checkpoint import (
    SAFETENSORS_FILE,
    file_record,
    is_checkpoint_folder,
    new_manifest,
    sha256_file,
    update_manifest,
    write_checkpoint,
)
from converter.errors import CaffeError
from segmentation.solver import CaffeSGD
from segmentation.train_config import TrainConfig
from verify.verdict import MANIFEST_KEY as PARITY_KEY

STATE_FILE = "trainer_state.pt"
SNAPSHOT_PREFIX = "iter_"


def snapshot_dir(out: Path, update: int) -> Path:
    return out / f"{SNAPSHOT_PREFIX}{update}"


def parent_record(parent_path: Path, parent_manifest: dict[str, Any]) -> dict[str, Any]:
    """The parent checkpoint as a snapshot's manifest records it: file, sha256, parity record."""
    return {
        "checkpoint": str(parent_path.resolve()),
        "weights": file_record(parent_path / SAFETENSORS_FILE),
        "parity": parent_manifest.get(PARITY_KEY),
        "created": parent_manifest.get("created"),
    }


def inherited_parity(parent: dict[str, Any]) -> dict[str, Any] | None:
    """The parent's parity record, its scope naming that it is the parent's (so describe_parity says so)."""
    record = parent.get("parity")
    if not record:
        return None
    scope = record.get("scope", "full")
    sha = parent["weights"]["sha256"][:12]
    return {**record, "scope": f"{scope}; verdict of the parent checkpoint {sha} this snapshot was trained from"}


def save_snapshot(
    out: Path,
    update: int,
    model: torch.nn.Module,
    optimizer: CaffeSGD,
    config: TrainConfig,
    parent: dict[str, Any],
    parent_manifest: dict[str, Any],
) -> Path:
    """Write OUT/iter_<update>/ as one unit: the checkpoint files plus trainer_state.pt, vouched for by the manifest.

    The folder is built in a staging folder beside it and put in place at once
    (`converter.atomic.replace_folder`), so an interrupted run leaves its earlier snapshots intact
    and never a half-written one under iter_<N>.
    """
    state = {
        "update": update,
        "optimizer": optimizer.state_dict(),
        "config": config.to_json(),
        "rng": {"torch": torch.get_rng_state()},
        "data_order": {"seed": config.seed, "next_slot": update * config.effective_batch},
    }
    manifest = new_manifest(
        inputs={"parent_checkpoint": parent["weights"]},
        prototxt_text=parent_manifest.get("prototxt_text"),
        model={key: value for key, value in parent_manifest["model"].items() if key != "arch"},
        surgery=None,
        coverage=None,
    )
    manifest[PARITY_KEY] = inherited_parity(parent)
    manifest["parent"] = parent
    manifest["training"] = {"update": update, "config": config.to_json()}
    manifest["preprocessing"] = {"mean_bgr": list(config.train_net["mean_bgr"])}
    state_dict = {key: value.detach().cpu() for key, value in model.state_dict().items()}

    def build(staging: Path) -> None:
        files = staging / "checkpoint"
        write_checkpoint(files, state_dict, manifest)
        for item in files.iterdir():
            os.replace(item, staging / item.name)
        files.rmdir()
        torch.save(state, staging / STATE_FILE)
        update_manifest(staging, "trainer_state", {"file": STATE_FILE, "sha256": sha256_file(staging / STATE_FILE)})

    return replace_folder(snapshot_dir(out, update), build, owned=is_checkpoint_folder)


def read_trainer_state(folder: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """The trainer state of a snapshot folder, checked against the sha256 its manifest records."""
    entry = manifest.get("trainer_state")
    path = folder / STATE_FILE
    if not entry or not path.is_file():
        raise CaffeError("not a training snapshot (no trainer_state.pt): --resume takes an OUT/iter_<N> folder", path=folder)
    if sha256_file(path) != entry.get("sha256"):
        raise CaffeError("trainer_state.pt does not match the sha256 in manifest.json", path=path)
    return torch.load(path, map_location="cpu", weights_only=True)
