"""The parity report files and the manifest's parity line, on a hand-made verification result."""

from __future__ import annotations

import json
import math

from verify.budget import ErrorStats, NoiseBudget, Tolerance, ulps
from verify.report import markdown_report, summary_line, write_report
from verify.result import FAIL, PASS, SKIPPED, BlobRow, Scheme, VerificationResult
from verify.verdict import describe_parity, parity_record

SCHEME = Scheme(budget_factor=10.0, floor=ulps(4), teacher=Tolerance(1e-5, 1e-6), description="scheme text")


def _row(name: str, err: float, noise: float, teacher: float | None, status: str) -> BlobRow:
    budget = NoiseBudget(ErrorStats(noise, noise / 10, 1.0), 10.0, ulps(4)).tolerance
    e2e = ErrorStats(err, err / 10, 1.0)
    return BlobRow(
        name=name,
        shape=(1, 8, 5, 5),
        status=status,
        end_to_end=e2e,
        noise=ErrorStats(noise, noise / 10, 1.0),
        budget=budget,
        end_to_end_ratio=budget.ratio(e2e),
        teacher=None if teacher is None else ErrorStats(teacher, teacher / 10, 1.0),
        teacher_inputs=() if teacher is None else ("pool1",),
        teacher_ratio=None if teacher is None else SCHEME.teacher.ratio(ErrorStats(teacher, teacher / 10, 1.0)),
    )


def _result(rows: tuple[BlobRow, ...], not_in_reference: tuple[str, ...] = ("res3a_branch1",)) -> VerificationResult:
    verdict = FAIL if any(r.failed for r in rows) else PASS
    return VerificationResult(
        verdict=verdict, rows=rows, scheme=SCHEME, producer="opencv 4.14", reference_path="ref.h5",
        device="cpu", dtype="float32", scope="full", not_in_reference=not_in_reference,
    )


FAILING = _result((
    _row("conv1", 1e-7, 1e-7, 1e-7, PASS),
    _row("pool1", 1e-7, 1e-7, None, PASS),
    _row("res2a", 0.5, 1e-6, 0.4, FAIL),
    _row("res2b", 0.6, 1e-6, 1e-7, FAIL),
))


def test_first_diverging_blob_is_the_first_failure_in_forward_order() -> None:
    assert FAILING.first_diverging.name == "res2a"
    assert FAILING.worst.name == "res2b"
    assert "first diverging blob 'res2a'" in summary_line(FAILING)


def test_report_files_hold_verdict_table_and_plot(tmp_path) -> None:
    files = write_report(FAILING, tmp_path / "parity")
    text = files.markdown.read_text()
    assert "**FAIL**" in text and "`res2a`" in text and "not in reference: res3a_branch1" in text
    assert "and 2 more (report.json lists all)" in markdown_report(_result(FAILING.rows, not_in_reference=tuple("abcdefghijklmn")))
    table_rows = [line for line in text.splitlines() if line.startswith("| ") and "`" in line]
    assert [line.split("|")[2].strip() for line in table_rows] == ["`conv1`", "`pool1`", "`res2a`", "`res2b`"]
    data = json.loads(files.json.read_text())
    assert data["first_diverging"] == "res2a"
    assert [b["name"] for b in data["blobs"]] == ["conv1", "pool1", "res2a", "res2b"]
    assert math.isclose(data["blobs"][2]["end_to_end"]["max_rel"], 0.5)
    assert files.plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(files.markdown.parent.glob(".*.tmp"))


def test_zero_and_nan_errors_do_not_break_the_report(tmp_path) -> None:
    nan_row = BlobRow("conv1", (1, 2), FAIL, end_to_end=ErrorStats(math.nan, math.nan, 1.0),
                      budget=Tolerance(1e-6, 1e-6), end_to_end_ratio=math.inf)
    zero_row = _row("pool1", 0.0, 0.0, 0.0, PASS)
    skipped = BlobRow("fc1_voc12", (1, 21, 5, 5), SKIPPED, note="head replaced by surgery")
    result = _result((nan_row, zero_row, skipped))
    write_report(result, tmp_path)
    assert "head replaced by surgery" in markdown_report(result)
    assert result.worst.name == "conv1"


def test_budget_tolerance_is_factor_times_noise_with_ulp_floor() -> None:
    budget = NoiseBudget(ErrorStats(max_abs=2e-4, mean_abs=0.0, scale=2.0), factor=10.0, floor=ulps(4))
    assert math.isclose(budget.tolerance.max_rel, 1e-3)
    assert math.isclose(budget.tolerance.mean_rel, 4 * 2.0**-23)
    assert NoiseBudget(None, 10.0, Tolerance(1e-5, 1e-6)).tolerance == Tolerance(1e-5, 1e-6)


def test_manifest_record_and_parity_line() -> None:
    record = parity_record(FAILING, "ab" * 32)
    assert record["verdict"] == "fail" and record["first_diverging_blob"]["name"] == "res2a"
    assert record["worst_blob"]["name"] == "res2b" and record["scope"] == "full"
    json.dumps(record)
    assert describe_parity({"parity": None}).startswith("checkpoint NOT verified")
    assert "FAILED" in describe_parity({"parity": record}) and "'res2a'" in describe_parity({"parity": record})
    passing = parity_record(_result((_row("conv1", 1e-7, 1e-7, None, PASS),)), "00" * 32)
    line = describe_parity({"parity": passing})
    assert line.startswith("checkpoint verified: PASS against opencv 4.14 on ") and line.endswith("(full)")
