"""Fine-tune DeepLab-v2 exactly as the Caffe release's solver did: `python -m segmentation train` / `make train`.

Defaults are the official VOC12 solver and data layer (DESIGN.md, "Facts of Caffe's solver"): SGD
momentum 0.9 kept across updates, base_lr 2.5e-4 with poly 0.9 over 20000 updates, weight decay 5e-4,
head x10 / x20 (no decay on biases), frozen BatchNorm, effective batch 10 (batch per forward x iter_size
x world size), random scale / mirror / crop 321, four SoftmaxWithLoss terms. Every departure is an option.

Parts: the run's configuration (train_config), data by slot (train_data), snapshots, the run log
(train_log); here `get_dataset`, one update (`train_one_update`), the update loop (`train`) and `main`.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from converter.build_cli import name_value_pairs
from converter.checkpoint import read_checkpoint
from converter.errors import CaffeError
from converter.loading import build_model
from models.deeplab import DeepLabV2MSC
from segmentation.data import read_list
from segmentation.distributed import Dist, init_distributed, leave_distributed, resolve_device
from segmentation.losses import LOSS_NAMES, deeplab_losses
from segmentation.snapshots import parent_record, read_trainer_state, save_snapshot, snapshot_dir
from segmentation.solver import CaffeSGD, SolverConfig, defines_in, param_groups, read_solver, read_text
from segmentation.train_config import SpeedOptions, TrainConfig, derive_iter_size, transform_params
from segmentation.train_data import SlotSampler, TrainSlots, check_dataset, make_loader
from segmentation.train_log import CURVE_FILE, LOG_FILE, RunLog, plot_loss_curve
from segmentation.train_net import TrainNet, default_train_net, read_train_net
from segmentation.train_speed import fold_frozen_batchnorm
from segmentation.transforms import DEFAULT_CROP
from segmentation.voc import NUM_CLASSES
from verify.verdict import MANIFEST_KEY as PARITY_KEY
from verify.verdict import describe_parity

log = logging.getLogger(__name__)

EXIT_BAD_INPUT = 2
DEFAULT_EFFECTIVE_BATCH = 10  # Caffe: batch_size 1 x iter_size 10


# --------------------------------------------------------------------------- data


def get_dataset(config: TrainConfig, *, check: bool = True, progress: bool = True) -> TrainSlots:
    """The training slots of a config's list: files checked (all missing reported), labels and sizes verified."""
    samples = read_list(
        config.list,
        config.data,
        image_dir=config.image_dir,
        label_dir=config.label_dir,
        image_ext=config.image_ext,
        label_ext=config.label_ext,
    )
    if check:
        check_dataset(samples, config.num_classes, progress=progress)
    return TrainSlots(samples, transform_params(config.train_net), config.num_classes, config.seed)



# --------------------------------------------------------------------------- the update loop


def train_one_update(
    model: torch.nn.Module,
    optimizer: CaffeSGD,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    *,
    rate: float,
    iter_size: int,
    ignore_label: int,
    device: torch.device,
    speed: SpeedOptions,
    sync_context: Any = None,
) -> torch.Tensor:
    """One Caffe `Solver::Step`: iter_size forward/backward passes accumulating gradients, then ApplyUpdate.

    Returns the sums over the passes of the four loss terms (a tensor of 4, on `device`).
    `sync_context()` (DDP's no_sync) wraps all passes but the last.
    """
    sums = torch.zeros(len(LOSS_NAMES), device=device)
    memory_format = torch.channels_last if speed.channels_last else torch.contiguous_format
    for step in range(iter_size):
        data, label = next(batches)
        data = data.to(device, non_blocking=True).contiguous(memory_format=memory_format)
        label = label.to(device, non_blocking=True).long()
        last = step == iter_size - 1
        context = sync_context() if (sync_context is not None and not last) else contextlib.nullcontext()
        with context:
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=speed.bf16):
                outputs = model(data)
            losses = deeplab_losses(outputs, label, ignore_label)
            losses.total().backward()
        sums += torch.stack([term.detach() for term in losses])
    optimizer.step(rate)
    optimizer.zero_grad()
    return sums


@dataclass
class RunResult:
    """What a run did: updates done, the last snapshot, first and last total loss."""

    start_update: int
    end_update: int
    snapshot: Path | None
    first_loss: float | None
    last_loss: float | None


def train(
    model: DeepLabV2MSC,
    config: TrainConfig,
    *,
    out: Path,
    device: torch.device,
    place: Dist,
    parent: dict[str, Any],
    parent_manifest: dict[str, Any],
    start_update: int = 0,
    optimizer_state: dict[str, Any] | None = None,
    stop_after: int | None = None,
    dataset: TrainSlots | None = None,
    progress: bool = True,
) -> RunResult:
    """Run updates start_update .. min(max_iter, stop_after) - 1, snapshotting every `solver.snapshot` and at the end."""
    solver = config.solver
    stop = solver.max_iter if stop_after is None else min(solver.max_iter, stop_after)
    if stop <= start_update:
        raise CaffeError(f"nothing to train: the run is at update {start_update} and stops at {stop} (max_iter {solver.max_iter})")
    dataset = dataset or get_dataset(config, progress=progress and place.main)
    model.to(device)
    if config.speed.fold_bn:
        fold_frozen_batchnorm(model)
    if config.speed.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = CaffeSGD(
        param_groups(model, {k: tuple(v) for k, v in config.train_net["mults"].items()}),
        momentum=solver.momentum,
        weight_decay=solver.weight_decay,
        iter_size=config.iter_size,
    )
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    runner: torch.nn.Module = model
    sync_context = None
    if place.world_size > 1:
        runner = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False
        )
        sync_context = runner.no_sync
    if config.speed.compile:
        runner = torch.compile(runner)
    sampler = SlotSampler(
        start_update, stop, batch_size=config.batch_size, iter_size=config.iter_size, world_size=place.world_size, rank=place.rank
    )
    loader = make_loader(
        dataset, sampler, batch_size=config.batch_size, workers=config.speed.workers, pin_memory=device.type == "cuda"
    )
    batches = iter(loader)
    run_log = RunLog(out, start_update, enabled=place.main)
    snapshot = None
    first_loss = last_loss = None
    bar = tqdm(range(start_update, stop), desc="train", unit="update", disable=not (progress and place.main), initial=0)
    try:
        for update in bar:
            rate = solver.rate(update)
            started = time.perf_counter()
            sums = train_one_update(
                runner,
                optimizer,
                batches,
                rate=rate,
                iter_size=config.iter_size,
                ignore_label=config.train_net["ignore_label"],
                device=device,
                speed=config.speed,
                sync_context=sync_context,
            )
            if place.world_size > 1:
                dist.all_reduce(sums)
            terms = (sums / (config.iter_size * place.world_size)).tolist()
            elapsed = time.perf_counter() - started
            row = {
                "update": update,
                "lr": rate,
                "total_loss": sum(terms),
                **dict(zip(LOSS_NAMES, terms)),
                "images_per_s": config.effective_batch / elapsed,
            }
            if not all(math.isfinite(value) for value in terms):
                raise CaffeError(f"update {update}: the loss is not finite ({terms}); lower the learning rate")
            first_loss = row["total_loss"] if first_loss is None else first_loss
            last_loss = row["total_loss"]
            run_log.add(row)
            bar.set_postfix(loss=f"{row['total_loss']:.4f}", lr=f"{rate:.3g}", img_s=f"{row['images_per_s']:.1f}")
            done = update + 1
            if done < stop and solver.snapshot and done % solver.snapshot == 0:
                snapshot = _snapshot(out, done, model, optimizer, config, parent, parent_manifest, place)
        snapshot = _snapshot(out, stop, model, optimizer, config, parent, parent_manifest, place)
    finally:
        bar.close()
        run_log.close()
    if place.main and (out / LOG_FILE).exists():
        plot_loss_curve(out / LOG_FILE, out / CURVE_FILE)
    return RunResult(start_update, stop, snapshot, first_loss, last_loss)


def _snapshot(out: Path, update: int, model, optimizer, config, parent, parent_manifest, place: Dist) -> Path:
    path = snapshot_dir(out, update)
    if place.main:
        save_snapshot(out, update, model, optimizer, config, parent, parent_manifest)
        log.info("snapshot %s", path)
    if place.world_size > 1:
        dist.barrier()
    return path


# --------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m segmentation train",
        description="Fine-tune DeepLab-v2 as the Caffe release's solver did (defaults: the VOC12 solver and data layer).",
    )
    io_group = parser.add_argument_group("inputs and outputs")
    io_group.add_argument("--checkpoint", help="checkpoint folder to start from (e.g. the converted init)")
    io_group.add_argument("--data", help="dataset root (Caffe: image_data_param.root_folder)")
    io_group.add_argument("--list", help="list file (Caffe: image_data_param.source): '/JPEGImages/x.jpg /Seg/x.png' lines or ids")
    io_group.add_argument("--out", help="output folder: iter_<N>/ snapshots, log.csv, loss_curve.png (resume: the snapshot's)")
    io_group.add_argument("--resume", help="continue exactly from a snapshot folder OUT/iter_<N>")
    io_group.add_argument("--image-dir", default="JPEGImages", help="image folder for id lists")
    io_group.add_argument("--label-dir", default="SegmentationClassAug", help="label folder for id lists")
    io_group.add_argument("--image-ext", default=".jpg", help="image extension for id lists")
    io_group.add_argument("--label-ext", default=".png", help="label extension for id lists")
    io_group.add_argument("--num-classes", type=int, default=NUM_CLASSES, help="classes of the dataset (Caffe: num_output of fc1_*)")
    io_group.add_argument("--allow-unverified", action="store_true", help="train from a checkpoint whose parity verification FAILED")
    caffe = parser.add_argument_group("Caffe files")
    caffe.add_argument("--solver", help="Caffe solver.prototxt (SolverParameter)")
    caffe.add_argument("--train-net", help="Caffe train prototxt: transform_param, param lr_mult/decay_mult, loss ignore_label")
    caffe.add_argument("--define", action="append", default=[], metavar="NAME=VALUE", help="substitute ${NAME} in the Caffe files")
    solver = parser.add_argument_group("solver (override the solver file / the release's values)")
    solver.add_argument("--base-lr", type=float, help="Caffe: base_lr (2.5e-4)")
    solver.add_argument("--power", type=float, help="Caffe: power of lr_policy poly (0.9)")
    solver.add_argument("--momentum", type=float, help="Caffe: momentum (0.9)")
    solver.add_argument("--weight-decay", type=float, help="Caffe: weight_decay (5e-4)")
    solver.add_argument("--max-iter", type=int, help="Caffe: max_iter, updates (20000): the poly horizon and the stop")
    solver.add_argument("--snapshot", type=int, help="Caffe: snapshot, updates between snapshots (0: at the end only)")
    solver.add_argument("--stop-after", type=int, help="stop after this many updates in all, schedule unchanged")
    solver.add_argument("--effective-batch", type=int, help="images per update (Caffe: batch_size x iter_size; 10)")
    solver.add_argument("--batch-size", type=int, help="images per forward (Caffe: batch_size; default 1 on CPU, all on GPU)")
    solver.add_argument("--seed", type=int, default=0, help="seed of data order and augmentation (Caffe: random_seed)")
    data = parser.add_argument_group("data layer (override the train net / the release's values)")
    data.add_argument("--crop-size", type=int, help=f"Caffe: transform_param.crop_size ({DEFAULT_CROP}; must be 32k+1)")
    data.add_argument("--no-mirror", action="store_true", help="Caffe: transform_param.mirror false")
    data.add_argument("--scale-factors", type=float, nargs="+", help="Caffe: transform_param.scale_factors (0.5 0.75 1 1.25 1.5)")
    data.add_argument("--mean-bgr", type=float, nargs=3, help="Caffe: transform_param.mean_value (104.008 116.669 122.675)")
    speed = parser.add_argument_group("speed (defaults: on for CUDA, off on CPU)")
    speed.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (CUDA when available)")
    speed.add_argument("--bf16", action=argparse.BooleanOptionalAction, help="bfloat16 autocast of the forward")
    speed.add_argument("--channels-last", action=argparse.BooleanOptionalAction, help="channels_last memory format")
    speed.add_argument("--fold-bn", action=argparse.BooleanOptionalAction, help="frozen BatchNorm+Scale as one multiply-add")
    speed.add_argument("--compile", action=argparse.BooleanOptionalAction, help="torch.compile the model")
    speed.add_argument("--workers", type=int, help="data-loader worker processes (default: 8 on CUDA, 2 on CPU)")
    speed.add_argument("--threads", type=int, help="CPU threads per process (torch.set_num_threads; default: torch's)")
    return parser


def _solver_config(args: argparse.Namespace, defines: dict[str, str]) -> SolverConfig:
    solver = read_solver(args.solver, defines) if args.solver else SolverConfig()
    overrides = {
        name: getattr(args, name)
        for name in ("base_lr", "power", "momentum", "weight_decay", "max_iter", "snapshot")
        if getattr(args, name) is not None
    }
    return replace(solver, **overrides)


def _train_net(args: argparse.Namespace, model: DeepLabV2MSC, defines: dict[str, str]) -> TrainNet:
    net = read_train_net(args.train_net, model, model.config, defines) if args.train_net else default_train_net(model)
    transform = net.transform
    changes: dict[str, Any] = {}
    if args.crop_size is not None:
        changes.update(crop_height=args.crop_size, crop_width=args.crop_size)
    if args.no_mirror:
        changes["mirror"] = False
    if args.scale_factors is not None:
        changes["scale_factors"] = tuple(args.scale_factors)
    if args.mean_bgr is not None:
        changes["mean_bgr"] = tuple(args.mean_bgr)
    return replace(net, transform=replace(transform, **changes)) if changes else net


def _speed(args: argparse.Namespace, device: torch.device) -> SpeedOptions:
    on_gpu = device.type == "cuda"

    def choose(value: bool | None) -> bool:
        return on_gpu if value is None else value

    workers = args.workers if args.workers is not None else (8 if on_gpu else 2)
    if workers < 0:
        raise CaffeError(f"--workers must be >= 0, got {workers}")
    return SpeedOptions(
        bf16=choose(args.bf16),
        channels_last=choose(args.channels_last),
        fold_bn=choose(args.fold_bn),
        compile=choose(args.compile),
        workers=workers,
    )


def _check_parity(manifest: dict[str, Any], allow_unverified: bool) -> str:
    """Print the parent's verdict; refuse a FAILED one unless allowed."""
    line = describe_parity(manifest)
    record = manifest.get(PARITY_KEY)
    if record and record.get("verdict") != "pass" and not allow_unverified:
        raise CaffeError(f"{line}; refusing to train from it (pass --allow-unverified to override)")
    return line


def _plan_new_run(args: argparse.Namespace, place: Dist, device: torch.device):
    for name in ("checkpoint", "data", "list"):
        if not getattr(args, name):
            raise CaffeError(f"--{name} is required (unless --resume)")
    checkpoint = Path(args.checkpoint)
    state_dict, parent_manifest = read_checkpoint(checkpoint)
    parity_line = _check_parity(parent_manifest, args.allow_unverified)
    model = build_model(parent_manifest, state_dict, source=checkpoint)
    if model.num_classes != args.num_classes:
        raise CaffeError(
            f"checkpoint has {model.num_classes} classes but the dataset has {args.num_classes} (--num-classes); "
            "convert the init with --classes to replace the head",
            path=checkpoint,
        )
    defines = name_value_pairs(args.define, "--define")
    files = [Path(name) for name in (args.solver, args.train_net) if name]
    unused = [name for name in defines if not any(defines_in(read_text(file), {name: ""}) for file in files)]
    if unused:
        raise CaffeError(f"--define {', '.join(unused)}: no such ${{...}} placeholder in the solver or train net files")
    solver = _solver_config(args, defines)
    net = _train_net(args, model, defines)
    effective = args.effective_batch or net.batch_size * solver.iter_size or DEFAULT_EFFECTIVE_BATCH
    if args.batch_size is not None:
        batch_size = args.batch_size
    else:
        batch_size = effective // place.world_size if device.type == "cuda" and effective % place.world_size == 0 else 1
    iter_size = derive_iter_size(effective, batch_size, place.world_size)
    config = TrainConfig(
        data=str(Path(args.data).resolve()),
        list=str(Path(args.list).resolve()),
        solver=replace(solver, iter_size=iter_size),
        train_net=net.to_json(),
        batch_size=batch_size,
        iter_size=iter_size,
        world_size=place.world_size,
        num_classes=args.num_classes,
        seed=args.seed,
        image_dir=args.image_dir,
        label_dir=args.label_dir,
        image_ext=args.image_ext,
        label_ext=args.label_ext,
        speed=_speed(args, device),
    )
    parent = parent_record(checkpoint, parent_manifest)
    return model, config, parent, parent_manifest, parity_line, 0, None


def _plan_resume(args: argparse.Namespace, place: Dist, device: torch.device):
    folder = Path(args.resume)
    state_dict, manifest = read_checkpoint(folder)
    state = read_trainer_state(folder, manifest)
    config = TrainConfig.from_json(state["config"])
    if config.world_size != place.world_size and config.effective_batch % place.world_size == 0:
        # Slots do not depend on the split, so another world size continues the same schedule.
        batch = config.batch_size if args.batch_size is None else args.batch_size
        iter_size = derive_iter_size(config.effective_batch, batch, place.world_size)
        config = replace(config, batch_size=batch, iter_size=iter_size, world_size=place.world_size,
                         solver=replace(config.solver, iter_size=iter_size))
    if args.workers is not None:
        config = replace(config, speed=replace(config.speed, workers=args.workers))
    if args.max_iter is not None and args.max_iter != config.solver.max_iter:
        raise CaffeError("--max-iter cannot change on resume: it is the poly horizon of the run", path=folder)
    parent = manifest["parent"]
    parity_line = describe_parity(manifest)
    model = build_model(manifest, state_dict, source=folder)
    torch.set_rng_state(state["rng"]["torch"])
    return model, config, parent, manifest, parity_line, int(state["update"]), state["optimizer"]


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m segmentation train ...`; exit 2 with one line on bad input, before any training."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.threads is not None:
            if args.threads < 1:
                raise CaffeError(f"--threads must be >= 1, got {args.threads}")
            torch.set_num_threads(args.threads)
        requested = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
        place = init_distributed("cuda" if requested.startswith("cuda") else "cpu")
        device = resolve_device(args.device, place)
        if args.stop_after is not None and args.stop_after < 1:
            raise CaffeError(f"--stop-after must be >= 1, got {args.stop_after}")
        if not args.out and not args.resume:
            raise CaffeError("--out is required")
        out = Path(args.out) if args.out else Path(args.resume).parent
        plan = _plan_resume if args.resume else _plan_new_run
        model, config, parent, parent_manifest, parity_line, start, optimizer_state = plan(args, place, device)
        if place.main:
            print(parity_line)
            if not (parent_manifest.get(PARITY_KEY) or parent.get("parity")):
                print("warning: the starting checkpoint was never verified against Caffe", file=sys.stderr)
            print(
                f"effective batch {config.effective_batch} = batch {config.batch_size} x iter_size {config.iter_size}"
                f" x world {config.world_size}; base_lr {config.solver.base_lr:g} {config.solver.lr_policy}"
                f" over {config.solver.max_iter} updates; device {device}"
            )
        dataset = get_dataset(config, progress=place.main)  # every file checked before anything is written
        if place.main:
            try:
                out.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise CaffeError(f"cannot create the output folder: {error.strerror or error}", path=out) from None
        result = train(
            model,
            config,
            out=out,
            device=device,
            place=place,
            parent=parent,
            parent_manifest=parent_manifest,
            start_update=start,
            optimizer_state=optimizer_state,
            stop_after=args.stop_after,
            dataset=dataset,
        )
    except CaffeError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    finally:
        leave_distributed()
    if place.main:
        losses = "" if result.first_loss is None else f"; total loss {result.first_loss:.4f} -> {result.last_loss:.4f}"
        print(f"trained updates {result.start_update}..{result.end_update - 1}{losses}; snapshot {result.snapshot}")
    return 0
