"""Error statistics of one blob and the noise budgets that judge them.

A blob's *scale* is the largest magnitude of its exact value; errors are reported as
absolute numbers and relative to that scale. A budget is derived from the model itself:
the PyTorch computation is run in float32 and in float64 on the same input and weights,
and the float32 rounding noise of that very blob (`max|x32 - x64|`, `mean|x32 - x64|`)
times a factor is what another float32 implementation (the reference) may differ by,
never less than a floor. See verify/compare.py and docs/parity.md for the constants.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FLOAT32_EPS = float(torch.finfo(torch.float32).eps)


@dataclass(frozen=True)
class ErrorStats:
    """How far one tensor is from another: max and mean absolute difference and the scale they relate to."""

    max_abs: float
    mean_abs: float
    scale: float

    @property
    def max_rel(self) -> float:
        """Max absolute error as a fraction of the blob's scale (its largest exact magnitude)."""
        return _relative(self.max_abs, self.scale)

    @property
    def mean_rel(self) -> float:
        """Mean absolute error as a fraction of the blob's scale."""
        return _relative(self.mean_abs, self.scale)


@dataclass(frozen=True)
class Tolerance:
    """Limits on max and mean absolute error, as fractions of a blob's scale."""

    max_rel: float
    mean_rel: float

    def ratio(self, stats: ErrorStats) -> float:
        """How much of the tolerance the error uses (> 1 fails); NaN/inf errors give inf."""
        return max(_ratio(stats.max_rel, self.max_rel), _ratio(stats.mean_rel, self.mean_rel))


@dataclass(frozen=True)
class NoiseBudget:
    """An allowance derived from measured float32 noise: `factor` x noise, never below `floor`.

    Without a noise measurement (None) the floor alone is the tolerance.
    """

    noise: ErrorStats | None
    factor: float
    floor: Tolerance

    @property
    def tolerance(self) -> Tolerance:
        if self.noise is None:
            return self.floor
        return Tolerance(
            max_rel=max(self.factor * self.noise.max_rel, self.floor.max_rel),
            mean_rel=max(self.factor * self.noise.mean_rel, self.floor.mean_rel),
        )


def ulps(count: float) -> Tolerance:
    """`count` float32 ulps of a blob's scale, for both max and mean error."""
    return Tolerance(count * FLOAT32_EPS, count * FLOAT32_EPS)


def error_stats(actual: torch.Tensor, expected: torch.Tensor, *, scale: float | None = None) -> ErrorStats:
    """Max/mean |actual - expected| in float64; scale defaults to max|expected|.

    The difference is taken in float64 so the comparison adds no rounding of its own.
    """
    if actual.shape != expected.shape:
        raise ValueError(f"shape {tuple(actual.shape)} != {tuple(expected.shape)}")
    expected64 = expected.to(torch.float64)
    diff = (actual.to(device=expected64.device, dtype=torch.float64) - expected64).abs_()
    if scale is None:
        scale = float(expected64.abs().max()) if expected64.numel() else 0.0
    if diff.numel() == 0:
        return ErrorStats(0.0, 0.0, scale)
    return ErrorStats(max_abs=float(diff.max()), mean_abs=float(diff.mean()), scale=scale)


def _relative(error: float, scale: float) -> float:
    if error == 0.0:
        return 0.0
    return error / scale if scale > 0.0 else float("inf")


def _ratio(relative_error: float, limit: float) -> float:
    if relative_error != relative_error:  # NaN anywhere poisons the max
        return float("inf")
    if relative_error == 0.0:
        return 0.0
    return relative_error / limit if limit > 0.0 else float("inf")
