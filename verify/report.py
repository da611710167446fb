"""Write a verification's evidence to a folder: report.md (table), report.json (same data), errors.png (plot)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from converter.atomic import write_atomic
from verify.budget import ErrorStats, Tolerance
from verify.result import BlobRow, VerificationResult

PLOT_FLOOR = 1e-10  # where zero errors (exact steps) sit on the log-scale plot


@dataclass(frozen=True)
class ReportFiles:
    markdown: Path
    json: Path
    plot: Path


def write_report(result: VerificationResult, out_dir: str | Path) -> ReportFiles:
    """Write report.md, report.json and errors.png into out_dir (created if needed), each atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = ReportFiles(out / "report.md", out / "report.json", out / "errors.png")
    markdown = markdown_report(result).encode()
    data = json.dumps(result_to_json(result), indent=1, allow_nan=True).encode()
    plot = _plot_png(result)
    write_atomic(files.markdown, lambda path: path.write_bytes(markdown))
    write_atomic(files.json, lambda path: path.write_bytes(data))
    write_atomic(files.plot, lambda path: path.write_bytes(plot))
    return files


def summary_line(result: VerificationResult) -> str:
    """One line for the console: verdict, reference producer and the blob that decided it."""
    first = result.first_diverging
    if first is not None:
        return f"parity FAIL against {short_producer(result.producer)}: first diverging blob '{first.name}' ({_why(first)})"
    worst = result.worst
    worst_text = "" if worst is None else f"; worst blob '{worst.name}' at {worst.worst_ratio:.2g} of its tolerance"
    compared = sum(row.status != "skipped" for row in result.rows)
    return f"parity PASS against {short_producer(result.producer)}: {compared} blobs ({result.scope}){worst_text}"


def short_producer(producer: str) -> str:
    """The producer's name and version without its notes ("opencv 4.14.0 dnn (CPU, ...); ..." -> "opencv 4.14.0 dnn")."""
    return producer.split(";")[0].split(" (")[0].strip() or producer


def markdown_report(result: VerificationResult) -> str:
    """The Markdown report: header (verdict, producer, first diverging blob, scheme, device) and the blob table."""
    scheme = result.scheme
    first = result.first_diverging
    lines = [
        "# Parity report",
        "",
        f"- verdict: **{result.verdict.upper()}** ({result.scope})",
        f"- reference: {result.reference_path} (producer: {result.producer})",
        f"- first diverging blob: {'none' if first is None else f'`{first.name}` ({_why(first)})'}",
        f"- worst blob: {_worst_text(result)}",
        f"- device: {result.device}, verdict dtype {result.dtype}",
        f"- end-to-end budget: {scheme.budget_factor:g} x the blob's own float32-vs-float64 noise "
        f"(max and mean abs), at least {scheme.floor.max_rel:.2g} of its scale",
        f"- teacher forcing: max abs <= {scheme.teacher.max_rel:.0e} and mean abs <= "
        f"{scheme.teacher.mean_rel:.0e} of the output's scale, or {scheme.budget_factor:g} x the step's "
        "own float32 noise where that is more",
        "- scale of a blob: its largest magnitude; rel = error / scale",
    ]
    if result.stages_not_compared:
        lines.append(f"- stages not compared: {', '.join(result.stages_not_compared)} (partial reference, "
                     "verified with --allow-partial)")
    if result.not_in_reference:
        lines.append(f"- not in reference: {_listed(result.not_in_reference)}")
    if result.not_mapped:
        lines.append(f"- reference blobs with no PyTorch counterpart: {_listed(result.not_mapped)}")
    if result.timings:
        lines.append("- seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in result.timings.items()))
    lines += ["", scheme.description, ""]
    lines += [
        "| # | blob | shape | scale | max abs | mean abs | rel err | budget | ratio "
        "| teacher-forced rel err | its budget | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for index, row in enumerate(result.rows):
        e2e, budget, teacher = row.end_to_end, row.budget, row.teacher
        lines.append(
            "| "
            + " | ".join(
                [
                    str(index),
                    f"`{row.name}`",
                    "x".join(map(str, row.shape)),
                    _num(None if e2e is None else e2e.scale),
                    _num(None if e2e is None else e2e.max_abs),
                    _num(None if e2e is None else e2e.mean_abs),
                    _num(None if e2e is None else e2e.max_rel),
                    _num(None if budget is None else budget.max_rel),
                    _num(row.end_to_end_ratio, "{:.2f}"),
                    _num(None if teacher is None else teacher.max_rel),
                    _num(None if row.teacher_budget is None else row.teacher_budget.max_rel),
                    row.status.upper() if row.failed else row.status + (f" ({row.note})" if row.note else ""),
                ]
            )
            + " |"
        )
    if result.drift:
        lines += ["", "## Drift with faster arithmetic (information, not part of the verdict)", ""]
        blobs = list(next(iter(result.drift.values())))
        lines.append("| mode | " + " | ".join(f"`{b}`" for b in blobs) + " |")
        lines.append("|---|" + "---|" * len(blobs))
        for mode, per_blob in result.drift.items():
            lines.append(f"| {mode} | " + " | ".join(_num(per_blob.get(b)) for b in blobs) + " |")
        lines.append("")
        lines.append("Values: max abs error vs the reference as a fraction of the blob's scale.")
    return "\n".join(lines) + "\n"


def result_to_json(result: VerificationResult) -> dict[str, Any]:
    """The report's data as JSON-ready types (non-finite numbers stay non-finite)."""
    first, worst = result.first_diverging, result.worst
    return {
        "verdict": result.verdict,
        "scope": result.scope,
        "producer": result.producer,
        "reference": result.reference_path,
        "device": result.device,
        "dtype": result.dtype,
        "first_diverging": None if first is None else first.name,
        "worst": None if worst is None else worst.name,
        "scheme": scheme_to_json(result),
        "stages_not_compared": list(result.stages_not_compared),
        "not_in_reference": list(result.not_in_reference),
        "not_mapped": list(result.not_mapped),
        "drift": result.drift,
        "timings": result.timings,
        "blobs": [_row_to_json(row) for row in result.rows],
    }


def scheme_to_json(result: VerificationResult) -> dict[str, Any]:
    """The tolerance scheme as data, for the report and the manifest."""
    scheme = result.scheme
    return {
        "description": scheme.description,
        "budget_factor": scheme.budget_factor,
        "end_to_end_floor": _tol_json(scheme.floor),
        "teacher_forcing_floor": _tol_json(scheme.teacher),
        "scale": "max abs of the exact value",
    }


def _row_to_json(row: BlobRow) -> dict[str, Any]:
    return {
        "name": row.name,
        "shape": list(row.shape),
        "status": row.status,
        "note": row.note,
        "end_to_end": _stats_json(row.end_to_end),
        "noise": _stats_json(row.noise),
        "budget": _tol_json(row.budget),
        "end_to_end_ratio": row.end_to_end_ratio,
        "teacher_forced": _stats_json(row.teacher),
        "teacher_inputs": list(row.teacher_inputs),
        "teacher_noise": _stats_json(row.teacher_noise),
        "teacher_budget": _tol_json(row.teacher_budget),
        "teacher_ratio": row.teacher_ratio,
    }


def _stats_json(stats: ErrorStats | None) -> dict[str, float] | None:
    if stats is None:
        return None
    return {
        "max_abs": stats.max_abs,
        "mean_abs": stats.mean_abs,
        "scale": stats.scale,
        "max_rel": stats.max_rel,
        "mean_rel": stats.mean_rel,
    }


def _tol_json(tol: Tolerance | None) -> dict[str, float] | None:
    return None if tol is None else {"max_rel": tol.max_rel, "mean_rel": tol.mean_rel}


def _why(row: BlobRow) -> str:
    parts = []
    if row.end_to_end_ratio is not None and row.end_to_end_ratio > 1 and row.end_to_end is not None:
        e = row.end_to_end
        parts.append(
            f"end to end: max abs {e.max_abs:.3g}, mean abs {e.mean_abs:.3g}, rel {e.max_rel:.3g}, "
            f"{row.end_to_end_ratio:.3g} x budget"
        )
    if row.teacher_ratio is not None and row.teacher_ratio > 1 and row.teacher is not None:
        t = row.teacher
        parts.append(
            f"teacher-forced from {'+'.join(row.teacher_inputs)}: max abs {t.max_abs:.3g}, "
            f"mean abs {t.mean_abs:.3g}, rel {t.max_rel:.3g}, {row.teacher_ratio:.3g} x tolerance"
        )
    return "; ".join(parts) or row.note


def _worst_text(result: VerificationResult) -> str:
    worst = result.worst
    if worst is None:
        return "none compared"
    return f"`{worst.name}` at {worst.worst_ratio:.3g} of its tolerance"


def _listed(names: tuple[str, ...], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more (report.json lists all)" if len(names) > limit else "")


def _num(value: float | None, fmt: str = "{:.3g}") -> str:
    if value is None:
        return "-"
    return fmt.format(value)


def _plot_png(result: VerificationResult) -> bytes:
    """Relative error per blob in forward order on a log scale, with the budget and the teacher tolerance."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    rows = result.rows
    x = list(range(len(rows)))
    fig = Figure(figsize=(min(16.0, max(8.0, 0.09 * len(rows))), 5.0), dpi=110)
    ax = fig.add_subplot()

    def series(values: list[float | None]) -> tuple[list[int], list[float]]:
        kept = [(i, max(v, PLOT_FLOOR)) for i, v in zip(x, values) if v is not None and not math.isnan(v)]
        return [i for i, _ in kept], [v for _, v in kept]

    budget_x, budget_y = series([None if r.budget is None else r.budget.max_rel for r in rows])
    ax.step(budget_x, budget_y, where="mid", color="tab:green", label="end-to-end budget (max abs / scale)")
    e2e_x, e2e_y = series([None if r.end_to_end is None else r.end_to_end.max_rel for r in rows])
    ax.plot(e2e_x, e2e_y, "o", ms=3, color="tab:blue", label="end to end vs reference (max abs / scale)")
    noise_x, noise_y = series([None if r.noise is None else r.noise.max_rel for r in rows])
    ax.plot(noise_x, noise_y, ".", ms=2, color="tab:gray", label="PyTorch float32 vs float64")
    tf_x, tf_y = series([None if r.teacher is None else r.teacher.max_rel for r in rows])
    ax.plot(tf_x, tf_y, "x", ms=4, color="tab:orange", label="teacher-forced (max abs / scale)")
    ax.axhline(result.scheme.teacher.max_rel, color="tab:orange", ls="--", lw=0.8, label="teacher-forcing floor")
    first = result.first_diverging
    if first is not None:
        index = rows.index(first)
        ax.axvline(index, color="tab:red", lw=1.0)
        ax.annotate(f"first diverging: {first.name}", (index, 0.97), xycoords=("data", "axes fraction"),
                    color="tab:red", ha="left", va="top", fontsize=8)
    ax.set_yscale("log")
    ax.set_xlabel("blob, in forward order")
    ax.set_ylabel("error / blob scale")
    ax.set_title(f"{result.verdict.upper()} against {short_producer(result.producer)} ({result.device}, "
                 f"{result.dtype}); zero errors drawn at {PLOT_FLOOR:g}", fontsize=9)
    if len(rows) <= 60:
        ax.set_xticks(x, [r.name for r in rows], rotation=90, fontsize=6)
    ax.grid(True, which="major", axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()
