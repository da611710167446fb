"""`make bench-eval` end to end on the tiny configuration (no timing asserted: a benchmark, not a test)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from benchmarks.bench_eval import main


def test_bench_eval_runs_all_paths_on_the_tiny_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config", "tiny", "--sizes", "33", "--images", "1", "--repeat", "1", "--threads", "1",
                 "--work", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| (")]
    assert [row.split()[1] for row in rows] == ["(a)", "(b)", "(b')", "(c)"]
    assert "| (b) fast: BN folded, channels_last | 33 |" in out  # folding passed the parity budget
    agreement = re.search(r"33: \(b\) argmax agreement with fp32 ([0-9.]+)%", out)
    assert agreement and float(agreement.group(1)) > 99.0  # the fp32 fast path changes rounding only
    assert "x OpenCV (target >= 3x:" in out
