"""Input kinds: which seed file a case replaces, how it is mutated, and the entry point that reads it.

A kind's target is the command line (`converter.cli.main`) where the kind is something a user
hands to a command, or the library call the commands make to read it (V1 caffemodels are read by
`load_net` for the layer registry; references by `read_activations` and its blob reads, as
`verify` does before running a model; checkpoint folders by `load_model`, as verify, train and
evaluate do). Library calls run behind the same contract as a command: CaffeError -> one line
`error: ...` and exit 2.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from converter.caffe.load import load_net
from converter.checkpoint import MANIFEST_FILE, PTH_FILE, SAFETENSORS_FILE
from converter.cli import main as convert_main
from converter.errors import CaffeError
from converter.loading import load_model
from fuzz import mutate
from fuzz.seeds import CAFFEMODEL, CHECKPOINT_DIR, HDF5, PROTOTXT, REFERENCE, V1_CAFFEMODEL, Seeds
from verify.activations import read_activations

EXIT_BAD_INPUT = 2
OUT_DIR = "out"  # the output folder of a convert case, inside the case folder


@dataclass(frozen=True)
class Case:
    """One fuzz case: the kind, the mutation applied, and the replaced files (name -> bytes)."""

    kind: str
    mutation: str
    files: dict[str, bytes] = field(default_factory=dict)
    origin: str = ""  # "seed S index I" for a generated case, to reproduce it


@dataclass(frozen=True)
class Kind:
    """An input kind: the seed file it mutates, its mutators, and how to run its entry point."""

    name: str
    member: str
    structure: dict[str, mutate.Mutator]
    run: Callable[[Seeds, Path], int]  # (seeds, case folder) -> exit code; prints like a command


def _convert(caffemodel: Path, prototxt: Path | None, folder: Path) -> int:
    args = ["convert", "--quiet", "--caffemodel", str(caffemodel), "--out", str(folder / OUT_DIR)]
    return convert_main(args + (["--prototxt", str(prototxt)] if prototxt else []))


def _as_command(call: Callable[[], object]) -> int:
    """A library call behind a command's contract: CaffeError is one line on stderr and exit 2."""
    try:
        call()
    except CaffeError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


def _read_reference(path: Path) -> None:
    with read_activations(path) as reference:
        for name in reference.names:
            reference.get(name)


def _run_caffemodel(seeds: Seeds, folder: Path) -> int:
    return _convert(folder / CAFFEMODEL, None, folder)


def _run_prototxt(seeds: Seeds, folder: Path) -> int:
    return _convert(seeds.path(CAFFEMODEL), folder / PROTOTXT, folder)


def _run_hdf5(seeds: Seeds, folder: Path) -> int:
    return _convert(folder / HDF5, seeds.path(PROTOTXT), folder)


def _run_v1(seeds: Seeds, folder: Path) -> int:
    return _as_command(lambda: load_net(weights=folder / V1_CAFFEMODEL))


def _run_reference(seeds: Seeds, folder: Path) -> int:
    return _as_command(lambda: _read_reference(folder / REFERENCE))


def _run_checkpoint(seeds: Seeds, folder: Path) -> int:
    return _as_command(lambda: load_model(folder / CHECKPOINT_DIR))


KINDS: dict[str, Kind] = {
    kind.name: kind
    for kind in (
        Kind("caffemodel", CAFFEMODEL,
             {"wire_field": mutate.wire_field, "protobuf_structure": mutate.protobuf_structure,
              "protobuf_unknown": mutate.protobuf_unknown}, _run_caffemodel),
        Kind("caffemodel_v1", V1_CAFFEMODEL,
             {"wire_field": mutate.wire_field, "protobuf_structure": mutate.protobuf_structure,
              "protobuf_unknown": mutate.protobuf_unknown}, _run_v1),
        Kind("prototxt", PROTOTXT,
             {"prototxt_structure": mutate.prototxt_structure, "prototxt_text": mutate.prototxt_text}, _run_prototxt),
        Kind("hdf5", HDF5, {"hdf5_structure": mutate.hdf5_structure}, _run_hdf5),
        Kind("reference", REFERENCE, {"reference_structure": mutate.reference_structure}, _run_reference),
        Kind("checkpoint", CHECKPOINT_DIR, {}, _run_checkpoint),
    )
}

CHECKPOINT_STRUCTURE: dict[str, dict[str, mutate.Mutator]] = {
    MANIFEST_FILE: {"json_structure": mutate.json_structure},
    SAFETENSORS_FILE: {"safetensors_structure": mutate.safetensors_structure},
    PTH_FILE: {},
}


def make_case(seeds: Seeds, kind: str, seed: int, index: int) -> Case:
    """The case number `index` of `kind` for a run seeded with `seed`: the same on every machine."""
    rng = random.Random(f"{seed}:{kind}:{index}")
    spec = KINDS[kind]
    origin = f"seed {seed} index {index}"
    if kind == "checkpoint":
        return dataclasses.replace(_checkpoint_case(seeds, rng), origin=origin)
    data = seeds.path(spec.member).read_bytes()
    name, mutator = _pick(spec.structure, rng)
    return Case(kind, name, {spec.member: _apply(mutator, data, rng)}, origin)


def _pick(structure: dict[str, mutate.Mutator], rng: random.Random) -> tuple[str, mutate.Mutator]:
    """Half the cases mutate bytes, half the structure (when the kind has structure mutators)."""
    table = structure if structure and rng.random() < 0.5 else mutate.BYTE_MUTATORS
    name = rng.choice(sorted(table))
    return name, table[name]


def _apply(mutator: mutate.Mutator, data: bytes, rng: random.Random) -> bytes:
    try:
        out = mutator(data, rng)
    except Exception:  # a structure the mutator cannot edit (h5py refuses a shape, a value out of range)
        out = mutate.flip_bits(data, rng)
    if rng.random() < 0.15:  # now and then a second mutation on top of the first
        out = rng.choice(list(mutate.BYTE_MUTATORS.values()))(out, rng) if out else out
    return out


def _checkpoint_case(seeds: Seeds, rng: random.Random) -> Case:
    """One member of the folder mutated; half the time the manifest is re-hashed so the loader must cope."""
    member = rng.choice(sorted(CHECKPOINT_STRUCTURE))
    name, mutator = _pick(CHECKPOINT_STRUCTURE[member], rng)
    data = _apply(mutator, seeds.checkpoint_file(member).read_bytes(), rng)
    files = {f"{CHECKPOINT_DIR}/{member}": data}
    if member != MANIFEST_FILE and rng.random() < 0.5:
        files[f"{CHECKPOINT_DIR}/{MANIFEST_FILE}"] = _rehashed_manifest(seeds, member, data)
    return Case("checkpoint", f"{member}:{name}", files)


def _rehashed_manifest(seeds: Seeds, member: str, data: bytes) -> bytes:
    manifest = json.loads(seeds.checkpoint_file(MANIFEST_FILE).read_text())
    manifest["files"][member] = hashlib.sha256(data).hexdigest()
    return json.dumps(manifest, indent=2).encode()


def lay_out(seeds: Seeds, case: Case, folder: Path) -> list[Path]:
    """Write the case's files into `folder` (a checkpoint case gets a full copy of the seed folder).

    Returns the input paths an error line may name.
    """
    folder.mkdir(parents=True, exist_ok=True)
    if case.kind == "checkpoint":
        (folder / CHECKPOINT_DIR).mkdir()
        for member in (MANIFEST_FILE, SAFETENSORS_FILE, PTH_FILE):
            (folder / CHECKPOINT_DIR / member).write_bytes(seeds.checkpoint_file(member).read_bytes())
    for name, data in case.files.items():
        (folder / name).write_bytes(data)
    named = [folder / name for name in case.files] + [folder / CHECKPOINT_DIR]
    return named + [seeds.path(CAFFEMODEL), seeds.path(PROTOTXT)]
