"""Checkpoint folders: model.pth, model.safetensors and manifest.json, written atomically.

The manifest is the checkpoint's evidence: hashes of the inputs and of the files written,
the net definition used, the model configuration, surgery, coverage of the name map,
library versions and (filled later by `verify`) the parity verdict. Each file is written
under a temporary name in the output folder and moved into place only when all are
complete, so a failed run leaves nothing new at the output paths.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import mmap
import os
import platform
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import safetensors.torch
import torch

from converter.atomic import temporary_beside, write_atomic
from converter.errors import CaffeError

log = logging.getLogger(__name__)

FORMAT = "caffe2torch-checkpoint"
VERSION = 1
ARCH = "deeplabv2_resnet_msc"
PTH_FILE = "model.pth"
SAFETENSORS_FILE = "model.safetensors"
MANIFEST_FILE = "manifest.json"
LEGACY_FILE = "legacy_model.pth"  # the earlier PyTorch port's layout, written on request
HASH_CHUNK = 64 << 20  # a multiple of the page size (madvise needs aligned starts)
_DISTRIBUTIONS = ("torch", "numpy", "protobuf", "h5py", "safetensors", "caffe2torch")


@dataclass(frozen=True)
class CheckpointPaths:
    """Where a checkpoint's files lie; `legacy` is None unless the legacy layout was exported."""

    out_dir: Path
    pth: Path
    safetensors: Path
    manifest: Path
    legacy: Path | None = None


def sha256_file(path: str | Path, chunk: int = HASH_CHUNK) -> str:
    """Hex sha256 of a file, hashed straight from a read-only mapping in `chunk`-byte steps (64 MiB;
    a multiple of the page size).

    No chunk is copied into Python bytes and hashlib drops the GIL for each step, so a hash on a
    worker thread overlaps the caller's work; each step's pages are released once hashed, so
    memory stays flat for any size (and a file the caller has mapped too is not counted twice).
    """
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        size = os.fstat(stream.fileno()).st_size
        if size == 0:
            return digest.hexdigest()
        with mmap.mmap(stream.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            with memoryview(mapped) as view:
                for start in range(0, size, chunk):
                    with view[start : start + chunk] as step:
                        digest.update(step)
                    mapped.madvise(mmap.MADV_DONTNEED, start, min(chunk, size - start))
    return digest.hexdigest()


def file_record(path: str | Path) -> dict[str, Any]:
    """Manifest entry of an input file: its absolute path (verify reuses it from any folder), sha256 and size."""
    return {"path": str(Path(path).resolve()), "sha256": sha256_file(path), "size": os.path.getsize(path)}


def library_versions() -> dict[str, str | None]:
    """Versions of Python and the libraries that shaped the checkpoint (None: not installed as a package)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in _DISTRIBUTIONS:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def new_manifest(
    *,
    inputs: dict[str, Any],
    prototxt_text: str | None,
    model: dict[str, Any],
    surgery: dict[str, Any] | None,
    coverage: dict[str, Any] | None,
) -> dict[str, Any]:
    """A manifest with the fixed fields filled; `write_checkpoint` adds the hashes of the files it writes."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "inputs": inputs,
        "prototxt_text": prototxt_text,
        "model": {"arch": ARCH, **model},
        "surgery": surgery,
        "coverage": coverage,
        "versions": library_versions(),
        "files": {},
        "parity": None,
    }


def _make_dir(out_dir: Path) -> list[Path]:
    """Create `out_dir` (and parents); return the folders created, deepest first, for cleanup."""
    missing = []
    probe = out_dir
    while not probe.exists():
        missing.append(probe)
        probe = probe.parent
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CaffeError(f"cannot create the output folder: {error.strerror or error}", path=out_dir) from None
    if not os.access(out_dir, os.W_OK):
        raise CaffeError("output folder is not writable", path=out_dir)
    return missing


def _write_temp(out_dir: Path, name: str, write: Callable[[Path], None], temps: list[Path]) -> Path:
    temp = temporary_beside(out_dir / name)
    temps.append(temp)
    write(temp)
    return temp


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def write_checkpoint(
    out_dir: str | Path,
    state_dict: dict[str, torch.Tensor],
    manifest: dict[str, Any],
    *,
    legacy_state_dict: dict[str, torch.Tensor] | None = None,
) -> CheckpointPaths:
    """Write model.pth, model.safetensors (and legacy_model.pth if given) and manifest.json into `out_dir`.

    The manifest gains `files`: the sha256 of each file written. All files are written as
    temporaries in `out_dir` first; on any failure the temporaries (and folders this call
    created) are removed and existing files at the output paths are untouched.
    """
    out = Path(out_dir)
    created_dirs = _make_dir(out)
    tensors = {key: value.contiguous() for key, value in state_dict.items()}
    writers: dict[str, Callable[[Path], None]] = {
        PTH_FILE: lambda path: torch.save(tensors, path),
        SAFETENSORS_FILE: lambda path: safetensors.torch.save_file(tensors, str(path)),
    }
    if legacy_state_dict is not None:
        writers[LEGACY_FILE] = lambda path: torch.save(legacy_state_dict, path)
    temps: list[Path] = []
    try:
        # Each file is hashed in a worker thread while the next one is written (hashlib releases the GIL).
        with ThreadPoolExecutor(max_workers=2) as pool:
            written, hashes = {}, {}
            for name, write in writers.items():
                written[name] = _write_temp(out, name, write, temps)
                hashes[name] = pool.submit(sha256_file, written[name])
            manifest["files"] = {name: future.result() for name, future in hashes.items()}
        written[MANIFEST_FILE] = _write_temp(out, MANIFEST_FILE, lambda path: _write_json(path, manifest), temps)
        for name, temp in written.items():  # the manifest last: it vouches for the others
            os.replace(temp, out / name)
            temps.remove(temp)
    except BaseException as error:
        for temp in temps:
            temp.unlink(missing_ok=True)
        for folder in created_dirs:
            try:
                folder.rmdir()
            except OSError:
                break
        if isinstance(error, OSError):
            raise CaffeError(f"cannot write the checkpoint: {error.strerror or error}", path=out) from None
        raise
    stale_legacy = out / LEGACY_FILE
    if legacy_state_dict is None and stale_legacy.exists():
        log.info("removing %s left by an earlier checkpoint in this folder", stale_legacy)
        stale_legacy.unlink()
    log.info("checkpoint written to %s", out)
    return CheckpointPaths(
        out_dir=out,
        pth=out / PTH_FILE,
        safetensors=out / SAFETENSORS_FILE,
        manifest=out / MANIFEST_FILE,
        legacy=None if legacy_state_dict is None else out / LEGACY_FILE,
    )


def read_manifest(out_dir: str | Path) -> dict[str, Any]:
    """The manifest of a checkpoint folder, checked for format and version."""
    path = Path(out_dir) / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CaffeError("no manifest.json: not a checkpoint folder written by caffe2torch", path=out_dir) from None
    except (OSError, ValueError) as error:
        raise CaffeError(f"cannot read the manifest: {error}", path=path) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CaffeError(f"not a {FORMAT} manifest", path=path)
    if manifest.get("version") != VERSION:
        raise CaffeError(f"manifest version {manifest.get('version')!r} is not supported (expected {VERSION})", path=path)
    return manifest


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """State dict and manifest from a checkpoint folder, its model.pth or its model.safetensors.

    A folder reads model.safetensors. The file read must match the sha256 its manifest records.
    """
    given = Path(path)
    if given.is_dir():
        folder, weights = given, given / SAFETENSORS_FILE
    elif given.name in (PTH_FILE, SAFETENSORS_FILE):
        folder, weights = given.parent, given
    elif given.name == LEGACY_FILE:
        raise CaffeError("this is the earlier port's layout; import it with `python -m converter import-legacy`", path=given)
    else:
        raise CaffeError(f"expected a checkpoint folder, {PTH_FILE} or {SAFETENSORS_FILE}", path=given)
    manifest = read_manifest(folder)
    if not weights.is_file():
        raise CaffeError("file is missing from the checkpoint folder", path=weights)
    recorded = manifest.get("files", {}).get(weights.name)
    if recorded != sha256_file(weights):
        raise CaffeError("file does not match the sha256 in manifest.json (changed or partly written)", path=weights)
    if weights.name == SAFETENSORS_FILE:
        state_dict = safetensors.torch.load_file(str(weights))
    else:
        state_dict = torch.load(weights, map_location="cpu", weights_only=True)
    return state_dict, manifest


def update_manifest(out_dir: str | Path, key: str, value: Any) -> dict[str, Any]:
    """Set one top-level manifest field (e.g. "parity") atomically; returns the new manifest."""
    out = Path(out_dir)
    manifest = read_manifest(out)
    manifest[key] = value
    write_atomic(out / MANIFEST_FILE, lambda path: _write_json(path, manifest))
    return manifest
