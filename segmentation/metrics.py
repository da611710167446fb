"""Segmentation scores from one dataset-level confusion matrix (the VOC protocol), not per-image averages.

Convention for a class absent from both the ground truth and the predictions (IoU = 0/0): it is left
out of the means and reported as None (JSON null), as mmsegmentation does. The VOC devkit scorer and
torchvision give NaN for it, which turns the whole mIoU into NaN and so tells nothing about the classes
that were there; on VOC val every class occurs, so all conventions agree on the published numbers.
A class absent from the ground truth but predicted scores IoU 0 (its false positives count). A class's
accuracy (recall) is undefined without ground truth pixels: None, left out of the mean accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from segmentation.voc import IGNORE_LABEL


@dataclass(frozen=True)
class Scores:
    """Fractions in [0, 1]; per-class lists in class order, None where undefined (see the module docstring)."""

    miou: float | None
    pixel_accuracy: float | None
    mean_accuracy: float | None
    fwiou: float | None
    iou: list[float | None]
    accuracy: list[float | None]
    absent: list[int]  # classes in neither the ground truth nor the predictions (left out of the means)
    pixels: int  # labelled (non-ignored) pixels scored


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> list[float | None]:
    return [float(n / d) if d > 0 else None for n, d in zip(numerator, denominator)]


def _mean(values: list[float | None]) -> float | None:
    defined = [v for v in values if v is not None]
    return float(np.mean(defined)) if defined else None


class ConfusionMatrix:
    """Counts (ground truth class, predicted class) pairs over a whole dataset; rows are ground truth."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_LABEL) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, target: torch.Tensor | np.ndarray, prediction: torch.Tensor | np.ndarray) -> None:
        """Add pixels: `target` and `prediction` hold class indices of the same shape; ignore_index in
        `target` is skipped. Values outside [0, num_classes) are a ValueError (the readers check first)."""
        target = torch.as_tensor(target).reshape(-1).to(torch.int64)
        prediction = torch.as_tensor(prediction).reshape(-1).to(torch.int64)
        if target.shape != prediction.shape:
            raise ValueError(f"target has {target.numel()} pixels, prediction {prediction.numel()}")
        if self.matrix.device != target.device:
            self.matrix = self.matrix.to(target.device)
        prediction = prediction.to(target.device)
        keep = target != self.ignore_index
        target, prediction = target[keep], prediction[keep]
        n = self.num_classes
        if target.numel() and (int(target.min()) < 0 or int(target.max()) >= n or int(prediction.min()) < 0
                               or int(prediction.max()) >= n):
            raise ValueError(f"class indices must lie in [0, {n}) (or be {self.ignore_index} in the target)")
        self.matrix += torch.bincount(target * n + prediction, minlength=n * n).reshape(n, n)

    def all_reduce(self) -> None:
        """Sum the matrices of every process under torch.distributed (no-op when not initialised)."""
        if dist.is_available() and dist.is_initialized():
            device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
            summed = self.matrix.to(device)  # NCCL reduces CUDA tensors only, gloo CPU ones
            dist.all_reduce(summed, op=dist.ReduceOp.SUM)
            self.matrix = summed.to(self.matrix.device)

    def compute(self) -> Scores:
        """IoU_c = TP / (TP + FP + FN), accuracy_c = TP / (TP + FN), their means, pixel accuracy and
        frequency-weighted IoU (sum over classes of gt frequency x IoU)."""
        matrix = self.matrix.cpu().numpy().astype(np.float64)
        true_positive = np.diag(matrix)
        in_target, in_prediction = matrix.sum(axis=1), matrix.sum(axis=0)
        union = in_target + in_prediction - true_positive
        iou = _ratio(true_positive, union)
        accuracy = _ratio(true_positive, in_target)
        total = matrix.sum()
        absent = [c for c in range(self.num_classes) if union[c] == 0]
        fwiou = None
        if total > 0:
            fwiou = float(sum(in_target[c] / total * iou[c] for c in range(self.num_classes) if in_target[c] > 0))
        return Scores(
            miou=_mean(iou),
            pixel_accuracy=float(true_positive.sum() / total) if total > 0 else None,
            mean_accuracy=_mean(accuracy),
            fwiou=fwiou,
            iou=iou,
            accuracy=accuracy,
            absent=absent,
            pixels=int(total),
        )
