"""The evidence an export leaves beside its output: a sidecar JSON naming the source checkpoint and the check's figures."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

from converter.atomic import write_atomic
from converter.checkpoint import MANIFEST_FILE, SAFETENSORS_FILE, library_versions, sha256_file

SIDECAR_SUFFIX = ".json"
FORMAT = "caffe2torch-export"
VERSION = 1


def sidecar_path(out: str | Path) -> Path:
    """Where the sidecar of an exported file lies: beside it, `<name>.json` (model.onnx -> model.onnx.json)."""
    out = Path(out)
    return out.with_name(out.name + SIDECAR_SUFFIX)


def checkpoint_folder(path: str | Path) -> Path:
    """The folder of a checkpoint given as a folder or as one of its files."""
    given = Path(path)
    return given if given.is_dir() else given.parent


def source_record(checkpoint: str | Path, manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The source checkpoint as the sidecar names it: its folder, the weights' sha256 and the manifest's sha256."""
    folder = checkpoint_folder(checkpoint)
    return {
        "checkpoint": str(folder.resolve()),
        "arch": (manifest.get("model") or {}).get("arch"),
        "sha256": {
            SAFETENSORS_FILE: (manifest.get("files") or {}).get(SAFETENSORS_FILE),
            MANIFEST_FILE: sha256_file(folder / MANIFEST_FILE),
        },
        "parity": manifest.get("parity"),
    }


def sidecar(kind: str, source: dict[str, Any], output: Path, details: dict[str, Any]) -> dict[str, Any]:
    """A sidecar record: what was exported from which checkpoint, the output's sha256 and the check's figures."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "kind": kind,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": source,
        "output": {"path": str(output.resolve()), "sha256": sha256_file(output), "size": output.stat().st_size},
        **details,
        "versions": library_versions(),
    }


def write_sidecar(out: str | Path, record: Mapping[str, Any]) -> Path:
    """Write `record` as the sidecar JSON of `out`, atomically."""
    text = json.dumps(record, indent=2) + "\n"
    return write_atomic(sidecar_path(out), lambda path: path.write_text(text, encoding="utf-8"))


def read_sidecar(out: str | Path) -> dict[str, Any] | None:
    """The sidecar of an exported file, or None when there is none."""
    path = sidecar_path(out)
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))
