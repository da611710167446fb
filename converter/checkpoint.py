"""Checkpoint folders: model.pth, model.safetensors and manifest.json, written atomically.

The manifest is the checkpoint's evidence: hashes of the inputs and of the files written,
the net definition used, the model configuration, surgery, coverage of the name map,
library versions and (filled later by `verify`) the parity verdict. The folder is written as
one unit: the files go into a staging folder beside it, which then takes the folder's place in
one step (converter/atomic.py), so a failed run leaves nothing new at the output path.
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

from converter.atomic import replace_folder, umask, write_atomic
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


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """JSON with no NaN/Infinity tokens (they are not JSON): a non-finite value is refused, not written."""
    try:
        text = json.dumps(data, indent=2, sort_keys=False, allow_nan=False)
    except ValueError:
        raise CaffeError("the manifest holds a NaN or infinite number; refusing to write invalid JSON", path=path) from None
    path.write_text(text + "\n", encoding="utf-8")


def _torch_save(obj: Any, path: Path) -> None:
    """torch.save, whose C++ writer reports a full disk as RuntimeError: an OSError like any other write."""
    try:
        torch.save(obj, path)
    except RuntimeError as error:
        raise OSError(f"torch.save could not write {path.name} (disk full?): {str(error).splitlines()[0]}") from None


def is_checkpoint_folder(folder: Path) -> bool:
    """Whether `folder` holds a manifest of this format: an earlier output that a new write may replace."""
    try:
        return json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8")).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def write_checkpoint(
    out_dir: str | Path,
    state_dict: dict[str, torch.Tensor],
    manifest: dict[str, Any],
    *,
    legacy_state_dict: dict[str, torch.Tensor] | None = None,
) -> CheckpointPaths:
    """Write model.pth, model.safetensors (and legacy_model.pth if given) and manifest.json as `out_dir`.

    The manifest gains `files`: the sha256 of each file written. `out_dir` must be absent, empty or
    an earlier checkpoint folder (anything else is refused). The set is written into a staging
    folder beside it and put in place as one unit (`converter.atomic.replace_folder`): a reader
    sees the old set or the new one, never a mix, nothing of the old set (a stale parity report)
    survives, and a failure leaves the old set as it was. Files follow the umask.
    """
    out = Path(out_dir)
    tensors = {key: value.contiguous() for key, value in state_dict.items()}
    writers: dict[str, Callable[[Path], None]] = {
        PTH_FILE: lambda path: _torch_save(tensors, path),
        SAFETENSORS_FILE: lambda path: safetensors.torch.save_file(tensors, str(path)),
    }
    if legacy_state_dict is not None:
        writers[LEGACY_FILE] = lambda path: _torch_save(legacy_state_dict, path)

    def build(staging: Path) -> None:
        # Each file is hashed in a worker thread while the next one is written (hashlib releases the GIL).
        with ThreadPoolExecutor(max_workers=2) as pool:
            hashes = {}
            for name, write in writers.items():
                write(staging / name)
                hashes[name] = pool.submit(sha256_file, staging / name)
            manifest["files"] = {name: future.result() for name, future in hashes.items()}
        _write_json(staging / MANIFEST_FILE, manifest)
        mode = 0o666 & ~umask()  # safetensors writes 0600 whatever the umask; all files alike
        for name in (*writers, MANIFEST_FILE):
            os.chmod(staging / name, mode)

    replace_folder(out_dir, build, owned=is_checkpoint_folder)
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
    _check_manifest_types(manifest, path)
    return manifest


# Top-level manifest fields and the JSON types they may hold (None: JSON null). A hand-edited manifest
# is checked here, on read, so no reader of it meets a list where a mapping belongs.
_MANIFEST_TYPES: dict[str, tuple[type, ...]] = {
    "created": (str,),
    "inputs": (dict, type(None)),
    "prototxt_text": (str, type(None)),
    "model": (dict,),
    "surgery": (dict, type(None)),
    "coverage": (dict, type(None)),
    "versions": (dict,),
    "files": (dict,),
    "parity": (dict, type(None)),
}


def _check_manifest_types(manifest: dict[str, Any], path: Path) -> None:
    for key, types in _MANIFEST_TYPES.items():
        if key in manifest and not isinstance(manifest[key], types):
            raise CaffeError(f"manifest field '{key}' holds {type(manifest[key]).__name__}, expected "
                             + " or ".join("null" if t is type(None) else _JSON_NAMES[t] for t in types), path=path)
    if not isinstance(manifest.get("model", {}).get("arch"), str):
        raise CaffeError("manifest field 'model' names no arch", path=path)
    bad = [name for name, digest in manifest.get("files", {}).items() if not isinstance(digest, str)]
    if bad:
        raise CaffeError(f"manifest field 'files' holds a non-text sha256 for {bad[0]}", path=path)
    inputs = manifest.get("inputs") or {}
    for name, record in inputs.items():
        if record is not None and not (isinstance(record, dict) and isinstance(record.get("path"), str)
                                       and isinstance(record.get("sha256"), str)):
            raise CaffeError(f"manifest input '{name}' is not a record with a path and a sha256", path=path)


_JSON_NAMES = {str: "text", dict: "a mapping", list: "a list"}


def manifest_path(path: str | Path) -> Path:
    """The manifest.json of a checkpoint given as its folder or as one of its files."""
    given = Path(path)
    return (given if given.is_dir() else given.parent) / MANIFEST_FILE


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
    try:
        if weights.name == SAFETENSORS_FILE:
            state_dict = safetensors.torch.load_file(str(weights))
        else:
            state_dict = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as error:  # the hash matched a hand-made manifest: the loaders raise many types for bad bytes
        raise CaffeError(f"cannot load the weights: damaged file ({type(error).__name__}: "
                         f"{str(error).splitlines()[0][:120] if str(error) else ''})", path=weights) from None
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise CaffeError("does not hold a state dict of tensors", path=weights)
    return state_dict, manifest


def update_manifest(out_dir: str | Path, key: str, value: Any) -> dict[str, Any]:
    """Set one top-level manifest field (e.g. "parity") atomically; returns the new manifest."""
    out = Path(out_dir)
    manifest = read_manifest(out)
    manifest[key] = value
    write_atomic(out / MANIFEST_FILE, lambda path: _write_json(path, manifest))
    return manifest
