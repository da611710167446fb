"""What a verification found: one row per blob in forward order, the verdict and how it was reached.

Plain data, so the report writers and the manifest record need no torch and no reference file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable

from verify.budget import ErrorStats, Tolerance

if TYPE_CHECKING:
    from verify.activations import ActivationsFile

PASS = "pass"
FAIL = "fail"
SKIPPED = "skipped"


@dataclass(frozen=True)
class BlobRow:
    """One reference blob: its end-to-end error against the noise budget and its teacher-forced error.

    `end_to_end` compares the PyTorch float32 value with the reference; `noise` is the
    PyTorch float32-vs-float64 discrepancy the budget is derived from; `teacher` compares
    the reference's output with the PyTorch module run on the reference's own inputs
    (`teacher_inputs`), None where the blob is not the output of a forced step;
    `teacher_noise` is that step's own float32 noise, measured only when its error
    exceeded the teacher-forcing floor; `teacher_budget` the tolerance it was judged by.
    """

    name: str
    shape: tuple[int, ...]
    status: str
    end_to_end: ErrorStats | None = None
    noise: ErrorStats | None = None
    budget: Tolerance | None = None
    end_to_end_ratio: float | None = None
    teacher: ErrorStats | None = None
    teacher_inputs: tuple[str, ...] = ()
    teacher_noise: ErrorStats | None = None
    teacher_budget: Tolerance | None = None
    teacher_ratio: float | None = None
    note: str = ""

    @property
    def failed(self) -> bool:
        return self.status == FAIL

    @property
    def worst_ratio(self) -> float:
        """The larger share of tolerance used by either check (0 when neither ran)."""
        return max(r for r in (self.end_to_end_ratio, self.teacher_ratio, 0.0) if r is not None)


@dataclass(frozen=True)
class Scheme:
    """The tolerance scheme in force: one noise factor, the end-to-end floor and the teacher-forcing floor."""

    budget_factor: float
    floor: Tolerance
    teacher: Tolerance
    description: str


@dataclass(frozen=True)
class VerificationResult:
    """The outcome of verifying a checkpoint against a reference-activations file."""

    verdict: str
    rows: tuple[BlobRow, ...]
    scheme: Scheme
    producer: str
    reference_path: str
    device: str
    dtype: str
    scope: str
    not_in_reference: tuple[str, ...] = ()
    stages_not_compared: tuple[str, ...] = ()  # whole stages the reference left out (--allow-partial)
    not_mapped: tuple[str, ...] = ()
    drift: dict[str, dict[str, float]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.verdict == PASS

    @property
    def first_diverging(self) -> BlobRow | None:
        """The first blob in forward order that fails either check."""
        return next((row for row in self.rows if row.failed), None)

    @property
    def worst(self) -> BlobRow | None:
        """The compared blob that uses the largest share of its tolerance."""
        compared = [row for row in self.rows if row.status != SKIPPED]
        return max(compared, key=lambda row: row.worst_ratio, default=None)


def verification_result(
    rows: Iterable[BlobRow],
    *,
    scheme: Scheme,
    reference: ActivationsFile,
    device: str,
    dtype: str,
    scope: str,
    **details: Any,
) -> VerificationResult:
    """The result of a verification against `reference` from its blob rows: the verdict is FAIL when any
    row failed, else PASS. The one place every verifier (DeepLab, generic net, ONNX) assembles its result;
    `details` are the optional VerificationResult fields (not_in_reference, not_mapped, drift, timings, ...)."""
    kept = tuple(rows)
    return VerificationResult(
        verdict=FAIL if any(row.failed for row in kept) else PASS,
        rows=kept,
        scheme=scheme,
        producer=reference.producer,
        reference_path=str(reference.path),
        device=device,
        dtype=dtype,
        scope=scope,
        **details,
    )
