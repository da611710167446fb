"""A training run's configuration: what it is defined by, recorded in every snapshot and its trainer state."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from converter.errors import CaffeError, listed
from segmentation.solver import SolverConfig
from segmentation.transforms import TransformParams
from segmentation.voc import NUM_CLASSES


@dataclass(frozen=True)
class SpeedOptions:
    """Fast paths; none changes the arithmetic of the solver, only rounding and speed."""

    bf16: bool = False  # autocast the forward to bfloat16 (losses in float32)
    channels_last: bool = False
    fold_bn: bool = False  # frozen BatchNorm+Scale as one multiply-add
    compile: bool = False  # torch.compile the model
    workers: int = 0  # data-loader worker processes


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run is defined by (recorded in every snapshot's manifest and trainer state)."""

    data: str
    list: str
    solver: SolverConfig
    train_net: dict[str, Any]
    batch_size: int
    iter_size: int
    world_size: int
    num_classes: int = NUM_CLASSES
    seed: int = 0
    image_dir: str = "JPEGImages"
    label_dir: str = "SegmentationClassAug"
    image_ext: str = ".jpg"
    label_ext: str = ".png"
    speed: SpeedOptions = field(default_factory=SpeedOptions)

    @property
    def effective_batch(self) -> int:
        return self.batch_size * self.iter_size * self.world_size

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["effective_batch"] = self.effective_batch
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainConfig:
        values = {k: v for k, v in data.items() if k != "effective_batch"}
        values["solver"] = SolverConfig(**values["solver"])
        values["speed"] = SpeedOptions(**values["speed"])
        return cls(**values)


def derive_iter_size(effective_batch: int, batch_size: int, world_size: int) -> int:
    """iter_size such that batch x iter_size x world = effective batch; a non-dividing split is an error."""
    per_step = batch_size * world_size
    if batch_size < 1 or effective_batch < 1 or effective_batch % per_step:
        raise CaffeError(
            f"effective batch {effective_batch} is not a multiple of batch size {batch_size} x world size {world_size}"
            f" (choose --batch-size among {listed([str(d) for d in _divisors(effective_batch // world_size)])})"
            if effective_batch % world_size == 0
            else f"effective batch {effective_batch} is not a multiple of the world size {world_size}"
        )
    return effective_batch // per_step


def _divisors(number: int) -> list[int]:
    return [d for d in range(1, number + 1) if number % d == 0]


def transform_params(train_net: dict[str, Any]) -> TransformParams:
    """The TransformParams recorded in a config's train_net entry."""
    return TransformParams(
        crop_height=train_net["crop"][0],
        crop_width=train_net["crop"][1],
        mirror=train_net["mirror"],
        mean_bgr=tuple(train_net["mean_bgr"]),  # type: ignore[arg-type]
        scale_factors=tuple(train_net["scale_factors"]),
        value_scale=train_net["value_scale"],
        ignore_label=train_net["ignore_label"],
    )
