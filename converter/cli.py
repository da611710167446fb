"""Command line: `python -m converter convert ...` and `python -m converter import-legacy ...`.

Bad input of any kind ends in one line `error: ...` on stderr and exit code 2, with nothing
written at the output folder.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import torch

from converter.build_cli import add_commands as add_build_commands
from converter.checkpoint import CheckpointPaths, file_record, new_manifest, write_checkpoint
from converter.deeplab.convert import convert_deeplab
from converter.deeplab.names import config_from_state_dict
from converter.errors import CaffeError
from converter.export.cli import add_export_commands
from converter.deeplab.legacy_port import LEGACY_BN_EPS, from_legacy, to_legacy
from converter.caffe.load import load_net, net_definition_text
from converter.deeplab.surgery import SurgeryReport, head_classes, replace_head
from converter.loading import MAX_CLASSES, load_weights_strictly
from models.deeplab import HEAD_WEIGHT_STD, DeepLabV2

log = logging.getLogger(__name__)

EXIT_BAD_INPUT = 2
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes 64 bits
RELEASE_FILES = ("train_iter_20000.caffemodel", "init.caffemodel")
RELEASE_HINT = (
    "the DeepLab-v2 release provides it (deeplab_aspp_resnet101 'prototxt_and_model' on the DeepLab-v2 "
    "project page); put it in data/, or run `make demo` for the whole pipeline on synthetic data"
)


def _require_file(path: Path, what: str) -> None:
    if path.is_file():
        return
    message = f"{what} does not exist" if not path.exists() else f"{what} is not a file"
    if what == "caffemodel" and path.name in RELEASE_FILES:
        message += f"; {RELEASE_HINT}"
    raise CaffeError(message, path=path)


def _apply_surgery(
    state_dict: dict[str, torch.Tensor], *, surgery: str, num_classes: int, seed: int, source: Path
) -> tuple[dict[str, torch.Tensor], SurgeryReport | None]:
    """SURGERY=auto: new head unless the source already has `num_classes`; off: the head must match."""
    if surgery == "off":
        found = head_classes(state_dict)
        if found != num_classes:
            raise CaffeError(
                f"head has {found} classes, --classes is {num_classes}; use --surgery auto to replace the head",
                path=source,
            )
        return state_dict, None
    return replace_head(state_dict, num_classes=num_classes, seed=seed, keep_if_matching=True)


def _model_entry(config: Any, num_classes: int, bn_eps: float) -> dict[str, Any]:
    return {
        "config": {"blocks": list(config.blocks), "stem_width": config.stem_width, "widths": list(config.widths)},
        "num_classes": num_classes,
        "bn_eps": bn_eps,
    }


def _print_files(paths: CheckpointPaths) -> None:
    for path in (paths.pth, paths.safetensors, paths.legacy, paths.manifest):
        if path is not None:
            print(f"  wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")


def _print_surgery(report: SurgeryReport | None) -> None:
    if report is None:
        print("surgery: off (head kept as converted)")
    elif report.kept:
        print(f"surgery: head kept ({report.num_classes} classes already)")
    else:
        print(
            f"surgery: dropped {len(report.dropped)} head tensors ({report.source_classes} classes), "
            f"created {len(report.created)} for {report.num_classes} classes (gaussian std {HEAD_WEIGHT_STD:g}, seed {report.seed})"
        )


def run_convert(args: argparse.Namespace) -> None:
    """Caffe DeepLab-v2 files -> checkpoint folder, with surgery and the manifest."""
    started = time.perf_counter()
    _check_arguments(args)
    caffemodel = Path(args.caffemodel)
    prototxt = Path(args.prototxt) if args.prototxt else None
    _require_file(caffemodel, "caffemodel")
    if prototxt is not None:
        _require_file(prototxt, "prototxt")
    with ThreadPoolExecutor(max_workers=1) as pool:  # hash the inputs while converting
        records = pool.submit(lambda: [None if path is None else file_record(path) for path in (caffemodel, prototxt)])
        net = load_net(weights=caffemodel, prototxt=prototxt)
        result = convert_deeplab(net, head_name=args.head, progress=not args.quiet and sys.stderr.isatty())
        state_dict, report = _apply_surgery(
            result.state_dict, surgery=args.surgery, num_classes=args.classes, seed=args.seed, source=caffemodel
        )
        # Work that does not need the hashes runs before waiting for them (hashing 0.5 GB takes longer).
        prototxt_text = prototxt.read_text(encoding="utf-8") if prototxt else net_definition_text(net)
        caffemodel_record, prototxt_record = records.result()
    config, num_classes = config_from_state_dict(state_dict)
    manifest = new_manifest(
        inputs={"caffemodel": caffemodel_record, "prototxt": prototxt_record},
        prototxt_text=prototxt_text,
        model=_model_entry(config, num_classes, result.bn_eps),
        surgery=None if report is None else report.as_dict(),
        coverage={"head_name": result.head_name, **result.coverage.as_dict()},
    )
    legacy = to_legacy(state_dict) if args.export_legacy else None
    paths = write_checkpoint(args.out, state_dict, manifest, legacy_state_dict=legacy)
    cov = result.coverage
    source = f"{caffemodel} with {prototxt}" if prototxt else str(caffemodel)
    print(f"read {source}: {cov.layers_read} layers ({cov.layers_with_blobs} with weights)")
    print(
        f"converted: {cov.blobs_consumed} blobs -> {cov.keys_filled} keys, head {result.head_name} "
        f"({result.num_classes} classes), blocks {list(config.blocks)}, bn eps {result.bn_eps:g}"
    )
    print(f"tower copies checked identical: {cov.tower_copies_checked} layers ({cov.tower_blobs_checked} blobs)")
    _print_surgery(report)
    _print_files(paths)
    print(f"done in {time.perf_counter() - started:.1f} s")


def _check_arguments(args: argparse.Namespace) -> None:
    """Range checks argparse's int() cannot make: one line naming the option, before any work."""
    if not args.out:
        raise CaffeError("--out is an empty string; give the output folder")
    classes = getattr(args, "classes", 1)
    if not 1 <= classes <= MAX_CLASSES:
        raise CaffeError(f"--classes {classes} is out of range (1 to {MAX_CLASSES})")
    seed = getattr(args, "seed", 0)
    if not 0 <= seed <= MAX_SEED:
        raise CaffeError(f"--seed {seed} is out of range (0 to 2**63 - 1)")


def _check_imported(state_dict: dict[str, torch.Tensor], source: Path) -> tuple[Any, int]:
    """The config and classes of imported weights, after checking they fit that model exactly and are finite."""
    try:
        config, num_classes = config_from_state_dict(state_dict)
        model = DeepLabV2(num_classes=num_classes, config=config, bn_eps=LEGACY_BN_EPS)
    except (CaffeError, ValueError, IndexError) as error:
        raise CaffeError(f"not the earlier port's DeepLab-v2 layout: {error}", path=source) from None
    load_weights_strictly(model, state_dict, source=source)
    for key, value in state_dict.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise CaffeError(f"{key} holds NaN or inf values", path=source)
    return config, num_classes


def run_import_legacy(args: argparse.Namespace) -> None:
    """An earlier-port .pth -> checkpoint folder in this project's layout."""
    started = time.perf_counter()
    _check_arguments(args)
    source = Path(args.from_legacy)
    _require_file(source, "legacy checkpoint")
    try:
        legacy = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for a file that is not a checkpoint
        # torch's own text may advise weights_only=False, which is unsafe to pass on: name the type only
        raise CaffeError(f"not a PyTorch state dict that loads safely ({type(error).__name__})", path=source) from None
    if not isinstance(legacy, dict):
        raise CaffeError(f"holds a {type(legacy).__name__}, not a state dict", path=source)
    try:
        state_dict = from_legacy(legacy)
    except CaffeError as error:
        raise CaffeError(error.message, path=source) from None
    config, num_classes = _check_imported(state_dict, source)
    manifest = new_manifest(
        inputs={"caffemodel": None, "prototxt": None, "legacy_checkpoint": file_record(source)},
        prototxt_text=None,
        model=_model_entry(config, num_classes, LEGACY_BN_EPS),
        surgery=None,
        coverage={"keys_filled": len(state_dict)},
    )
    paths = write_checkpoint(args.out, state_dict, manifest)
    print(f"imported {source}: {len(state_dict)} keys, blocks {list(config.blocks)}, {num_classes} classes")
    _print_files(paths)
    print(f"done in {time.perf_counter() - started:.1f} s")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m converter", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    commands = parser.add_subparsers(dest="command", required=True)

    convert = commands.add_parser("convert", help="DeepLab-v2 caffemodel (+ prototxt) -> checkpoint folder")
    convert.add_argument("--caffemodel", required=True, help="binary .caffemodel (or .caffemodel.h5)")
    convert.add_argument("--prototxt", help="net definition to use (default: the one inside the caffemodel)")
    convert.add_argument("--out", required=True, help="output folder for model.pth, model.safetensors, manifest.json")
    convert.add_argument("--surgery", choices=("auto", "off"), default="auto",
                         help="auto: new head unless the source head already has --classes classes; off: never")
    convert.add_argument("--classes", type=int, default=21, help="classes of the output head (default 21)")
    convert.add_argument("--seed", type=int, default=0, help="seed of a new head's gaussian weights")
    convert.add_argument("--head", help="head layer prefix, e.g. fc1_voc12 (default: detected)")
    convert.add_argument("--export-legacy", action="store_true",
                         help="also write legacy_model.pth in the earlier PyTorch port's key layout")
    convert.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    convert.set_defaults(run=run_convert)

    legacy = commands.add_parser("import-legacy", help="earlier PyTorch port's .pth -> checkpoint folder")
    legacy.add_argument("--from-legacy", required=True, help="state dict with Scale.* keys")
    legacy.add_argument("--out", required=True, help="output folder")
    legacy.set_defaults(run=run_import_legacy)
    add_export_commands(commands)
    add_build_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code (0 ok, 2 bad input)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        args.run(args)
    except CaffeError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0
