"""Caffe's SGD solver with the poly rate policy, exactly, and the reader of a Caffe solver.prototxt.

From BVLC `sgd_solver.cpp` (the deeplab-v2 fork's copy computes the same): `Solver::Step` runs
iter_size forward/backward passes that accumulate gradients, then `ApplyUpdate`, then the update
counter increments. `ApplyUpdate` for each parameter, in order:
  Normalize          diff *= 1 / iter_size
  Regularize (L2)    diff += weight_decay * decay_mult * w        (weight decay NOT divided by iter_size)
  ComputeUpdateValue history = momentum * history + rate * lr_mult * diff;  diff = history
  Update             w -= diff
The rate lives inside the history, so `torch.optim.SGD` (v = m v + g; w -= lr v) differs as soon
as poly moves the rate. poly: rate(k) = base_lr * (1 - k / max_iter) ^ power, k counted from 0.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

import numpy as np
import torch
from google.protobuf import text_format

from converter.caffe.files import input_file
from converter.caffe.prototxt import PLACEHOLDER, substitute_defines
from converter.caffe.schema import caffe_pb
from converter.errors import CaffeError, listed

POLICIES = ("poly", "fixed")


@dataclass(frozen=True)
class SolverConfig:
    """The solver values the trainer uses; defaults are the DeepLab-v2 VOC12 release's solver."""

    base_lr: float = 2.5e-4
    lr_policy: str = "poly"
    power: float = 0.9
    momentum: float = 0.9
    weight_decay: float = 5e-4
    iter_size: int = 10
    max_iter: int = 20000
    snapshot: int = 1000  # every N updates (0: only at the end); not an arithmetic field, this trainer's default

    def __post_init__(self) -> None:
        if self.lr_policy not in POLICIES:
            raise CaffeError(f"lr_policy {self.lr_policy!r} is not supported (supported: {', '.join(POLICIES)})")
        if self.max_iter < 1 or self.iter_size < 1 or self.snapshot < 0:
            raise CaffeError(f"max_iter and iter_size must be >= 1 and snapshot >= 0, got {self}")

    def rate(self, update: int) -> float:
        """The base learning rate of update `update` (counted from 0)."""
        return learning_rate(self, update)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def poly_rate(base_lr: float, update: int, max_iter: int, power: float) -> float:
    """Caffe's "poly" policy: base_lr * (1 - update / max_iter) ^ power; update 0 uses base_lr."""
    return base_lr * (1.0 - update / max_iter) ** power


def learning_rate(config: SolverConfig, update: int) -> float:
    """The rate of `update` under the config's policy."""
    if config.lr_policy == "fixed":
        return config.base_lr
    return poly_rate(config.base_lr, update, config.max_iter, config.power)


# --------------------------------------------------------------------------- solver.prototxt

# SolverParameter fields that set a SolverConfig value.
HONOURED = ("base_lr", "lr_policy", "power", "momentum", "weight_decay", "iter_size", "max_iter", "snapshot")
# Fields without effect on the arithmetic (display, paths, device, testing): accepted and not used.
NOT_USED = (
    "net", "train_net", "test_net", "test_iter", "test_interval", "test_compute_loss", "test_initialization",
    "display", "average_loss", "snapshot_prefix", "snapshot_format", "snapshot_after_train", "solver_mode",
    "device_id", "debug_info", "random_seed", "layer_wise_reduce",
)


def read_text(path: str | os.PathLike[str]) -> str:
    """A text file's content; a missing, empty, unreadable or non-UTF-8 file is a CaffeError naming it."""
    try:
        return input_file(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise CaffeError(f"not a text file (not UTF-8 at byte {error.start})", path=path) from None


def defines_in(text: str, defines: Mapping[str, str]) -> dict[str, str]:
    """The defines whose `${NAME}` `text` uses: one --define list serves the solver and the train net."""
    used = {match.group(1) for match in PLACEHOLDER.finditer(text)}
    return {name: value for name, value in defines.items() if name in used}


def read_solver(path: str | os.PathLike[str], defines: Mapping[str, str] | None = None) -> SolverConfig:
    """A SolverConfig from a Caffe solver.prototxt: HONOURED fields set values, NOT_USED fields are
    accepted, anything else (another solver type, clip_gradients, L1, step policies...) is refused."""
    text = read_text(path)
    text = substitute_defines(text, defines_in(text, defines or {}), path)
    pb = caffe_pb()
    param = pb.SolverParameter()
    try:
        text_format.Parse(text, param)
    except text_format.ParseError as error:
        undefined = sorted({match.group(1) for match in PLACEHOLDER.finditer(text)})
        hint = f" (placeholders {', '.join(undefined)} are undefined: give --define NAME=VALUE)" if undefined else ""
        raise CaffeError(f"not a Caffe SolverParameter: {error}{hint}", path=path) from None
    values: dict[str, Any] = {}
    refused = []
    for descriptor, value in param.ListFields():
        name = descriptor.name
        if name in HONOURED:
            values[name] = value
        elif name in NOT_USED:
            continue
        elif (name, value) in (("type", "SGD"), ("solver_type", pb.SolverParameter.SGD), ("regularization_type", "L2")):
            continue  # the defaults, written out
        elif name == "clip_gradients" and value < 0:
            continue  # Caffe's "off"
        else:
            refused.append(f"{name}: {value}")
    if refused:
        raise CaffeError(
            f"unsupported solver fields {listed(refused)} (supported: SGD, L2, lr_policy poly/fixed, no clipping; "
            f"honoured fields: {', '.join(HONOURED)})",
            path=path,
        )
    if "lr_policy" in values and values["lr_policy"] not in POLICIES:
        raise CaffeError(f"lr_policy {values['lr_policy']!r} is not supported (supported: {', '.join(POLICIES)})", path=path)
    defaults = SolverConfig()
    merged = {}
    for entry in fields(SolverConfig):
        value = values.get(entry.name, getattr(defaults, entry.name))
        merged[entry.name] = float32_decimal(value) if isinstance(value, float) else value
    return SolverConfig(**merged)


def float32_decimal(value: float) -> float:
    """A float32 prototxt value as its shortest decimal (2.5e-4, not 0.0002500000118743628)."""
    return float(str(np.float32(value)))


# --------------------------------------------------------------------------- the update


class CaffeSGD:
    """Caffe's SGD update with per-parameter lr_mult / decay_mult (param group keys), rate given per step.

    Gradients accumulated over `iter_size` backward passes are divided by iter_size here
    (Normalize), so the losses are not pre-divided. `step(rate)` applies one Caffe ApplyUpdate.
    The momentum history persists across updates and travels in `state_dict()`. (A plain class:
    torch.optim.Optimizer's constructor imports torch._dynamo, seconds per process for nothing used.)
    """

    def __init__(self, groups: list[dict[str, Any]], *, momentum: float, weight_decay: float, iter_size: int) -> None:
        self.param_groups = [
            {"params": list(group["params"]), "lr_mult": float(group.get("lr_mult", 1.0)), "decay_mult": float(group.get("decay_mult", 1.0))}
            for group in groups
        ]
        self.history: list[list[torch.Tensor | None]] = [[None] * len(group["params"]) for group in self.param_groups]
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.iter_size = iter_size

    @torch.no_grad()
    def step(self, rate: float) -> None:
        """One ApplyUpdate at base rate `rate`, in Caffe's order (see the module docstring)."""
        normalize = 1.0 / self.iter_size
        for group, histories in zip(self.param_groups, self.history):
            local_rate = rate * group["lr_mult"]
            local_decay = self.weight_decay * group["decay_mult"]
            for index, param in enumerate(group["params"]):
                if param.grad is None:
                    continue
                diff = param.grad
                if self.iter_size > 1:
                    diff.mul_(normalize)  # Normalize
                if local_decay:
                    diff.add_(param, alpha=local_decay)  # Regularize (L2)
                if histories[index] is None:
                    histories[index] = torch.zeros_like(param)
                history = histories[index]
                history.mul_(self.momentum).add_(diff, alpha=local_rate)  # ComputeUpdateValue
                param.sub_(history)  # Update

    def zero_grad(self) -> None:
        """Drop the accumulated gradients (the next update accumulates from zero)."""
        for group in self.param_groups:
            for param in group["params"]:
                param.grad = None

    def history_of(self, param: torch.Tensor) -> torch.Tensor | None:
        """The momentum history of `param` (None before its first update)."""
        for group, histories in zip(self.param_groups, self.history):
            for index, candidate in enumerate(group["params"]):
                if candidate is param:
                    return histories[index]
        raise KeyError("not a parameter of this solver")

    def state_dict(self) -> dict[str, Any]:
        """Multipliers and momentum histories, group by group (CPU tensors)."""
        return {
            "momentum": self.momentum,
            "weight_decay": self.weight_decay,
            "iter_size": self.iter_size,
            "groups": [
                {"lr_mult": group["lr_mult"], "decay_mult": group["decay_mult"], "history": [None if h is None else h.detach().cpu() for h in histories]}
                for group, histories in zip(self.param_groups, self.history)
            ],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the histories saved by `state_dict` for the same parameter grouping."""
        groups = state["groups"]
        layout = [(g["lr_mult"], g["decay_mult"], len(g["params"])) for g in self.param_groups]
        saved = [(g["lr_mult"], g["decay_mult"], len(g["history"])) for g in groups]
        if layout != saved:
            raise CaffeError(f"solver state does not fit the parameters: groups {saved} != {layout}")
        for group, histories, entry in zip(self.param_groups, self.history, groups):
            for index, (param, history) in enumerate(zip(group["params"], entry["history"])):
                if history is not None and history.shape != param.shape:
                    raise CaffeError(f"solver state history {index} has shape {tuple(history.shape)}, parameter {tuple(param.shape)}")
                histories[index] = None if history is None else history.to(param.device, param.dtype).clone()


def param_groups(
    model: torch.nn.Module, mults: Mapping[str, tuple[float, float]]
) -> list[dict[str, Any]]:
    """Group the model's trainable parameters by (lr_mult, decay_mult); every parameter must have an entry.

    Parameters with lr_mult 0 are frozen (requires_grad False) and left out, as Caffe never moves them.
    """
    named = dict(model.named_parameters())
    missing = [name for name in named if name not in mults]
    unknown = [name for name in mults if name not in named]
    if missing or unknown:
        raise CaffeError(f"lr_mult/decay_mult do not fit the model: missing {listed(missing)}; unknown {listed(unknown)}")
    groups: dict[tuple[float, float], list[torch.nn.Parameter]] = {}
    for name, param in named.items():
        lr_mult, decay_mult = mults[name]
        if lr_mult == 0:
            param.requires_grad_(False)
            continue
        groups.setdefault((float(lr_mult), float(decay_mult)), []).append(param)
    return [{"params": params, "lr_mult": lr, "decay_mult": decay} for (lr, decay), params in groups.items()]
