"""A training run's log: OUT/log.csv (one row per update), TensorBoard where installed, the loss curve PNG."""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path

from converter.atomic import write_atomic
from segmentation.losses import LOSS_NAMES

log = logging.getLogger(__name__)

LOG_FILE = "log.csv"
CURVE_FILE = "loss_curve.png"
LOG_COLUMNS = ("update", "lr", "total_loss", *LOSS_NAMES, "images_per_s")


class RunLog:
    """OUT/log.csv (one row per update), TensorBoard where installed; rows are flushed per update."""

    def __init__(self, out: Path, start_update: int, enabled: bool) -> None:
        self.path = out / LOG_FILE
        self.enabled = enabled
        self.stream: io.TextIOBase | None = None
        self.board = None
        if not enabled:
            return
        kept: list[dict[str, str]] = []
        if start_update and self.path.exists():
            with open(self.path, newline="") as stream:
                kept = [row for row in csv.DictReader(stream) if int(row["update"]) < start_update]
        write_atomic(self.path, lambda path: _write_rows(path, kept))
        self.stream = open(self.path, "a", newline="")
        self.writer = csv.DictWriter(self.stream, fieldnames=LOG_COLUMNS)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.board = SummaryWriter(str(out / "tensorboard"))
        except ImportError:
            log.info("tensorboard is not installed: no TensorBoard log (log.csv has every value)")

    def add(self, row: dict[str, float]) -> None:
        if not self.enabled or self.stream is None:
            return
        self.writer.writerow({key: row[key] for key in LOG_COLUMNS})
        self.stream.flush()
        if self.board is not None:
            for key in LOG_COLUMNS[1:]:
                self.board.add_scalar(f"train/{key}", row[key], int(row["update"]))

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()
        if self.board is not None:
            self.board.close()


def _write_rows(path: Path, rows: list[dict[str, str]]) -> None:
    with open(path, "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=LOG_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def read_log(path: Path) -> list[dict[str, float]]:
    """The rows of a log.csv as floats."""
    with open(path, newline="") as stream:
        return [{key: float(value) for key, value in row.items()} for row in csv.DictReader(stream)]


def plot_loss_curve(log_path: Path, out_png: Path) -> Path | None:
    """A PNG of the total loss and the four terms per update (None when the log has no rows)."""
    rows = read_log(log_path)
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    updates = [row["update"] for row in rows]
    figure, axis = plt.subplots(figsize=(8, 4.5))
    axis.plot(updates, [row["total_loss"] for row in rows], label="total_loss", linewidth=2)
    for name in LOSS_NAMES:
        axis.plot(updates, [row[name] for row in rows], label=name, linewidth=0.8, alpha=0.8)
    axis.set_xlabel("update")
    axis.set_ylabel("loss")
    axis.set_title("DeepLab-v2 training loss (SoftmaxWithLoss, VALID)")
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    write_atomic(out_png, lambda path: figure.savefig(path, format="png", dpi=100))
    plt.close(figure)
    return out_png
