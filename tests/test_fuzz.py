"""The fuzz harness: its verdicts, its limits, a fixed-seed run with no crash, and the kept crashes replayed."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from fuzz.run import ACCEPTED, CLEAN, CRASH, Limits, fuzz, load_regressions, run_tasks
from fuzz.seeds import Seeds, make_seeds
from fuzz.targets import KINDS, Case, Kind, make_case

FIXED_SEED = 20261202
FIXED_CASES_PER_KIND = 20
LIMITS = Limits(timeout=30.0)  # generous: two cores are shared with the rest of the suite


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> Seeds:
    return make_seeds(tmp_path_factory.mktemp("fuzz_seeds"))


def _probe(behaviour):
    """A kind whose entry point does `behaviour(folder)`; for pinning the harness's own verdicts."""
    return {"probe": Kind("probe", "probe.bin", {}, lambda seeds, folder: behaviour(folder))}


def _one(seeds: Seeds, behaviour, limits: Limits = LIMITS) -> tuple[str, str]:
    [outcome] = run_tasks(seeds, [Case("probe", "none", {"probe.bin": b"x"})], workers=1, limits=limits,
                          kinds=_probe(behaviour))
    return outcome.verdict, outcome.detail


def _error_line(folder: Path, text: str) -> int:
    print(text, file=sys.stderr)
    return 2


def test_one_error_line_naming_the_input_is_a_clean_error(seeds: Seeds) -> None:
    verdict, detail = _one(seeds, lambda f: _error_line(f, f"error: {f / 'probe.bin'}: truncated"))
    assert verdict == CLEAN and detail.endswith("truncated")
    assert _one(seeds, lambda f: 0)[0] == ACCEPTED


def test_an_error_that_names_no_input_file_is_a_crash(seeds: Seeds) -> None:
    verdict, detail = _one(seeds, lambda f: _error_line(f, "error: something went wrong"))
    assert verdict == CRASH and "names no input file" in detail


def test_two_error_lines_or_another_exit_code_are_crashes(seeds: Seeds) -> None:
    two = _one(seeds, lambda f: _error_line(f, f"error: {f / 'probe.bin'}: a\nerror: {f / 'probe.bin'}: b"))
    assert two[0] == CRASH and "2 error lines" in two[1]
    assert _one(seeds, lambda f: 3) == (CRASH, "exit code 3")


def test_an_exception_is_a_crash_naming_its_type(seeds: Seeds) -> None:
    verdict, detail = _one(seeds, lambda f: {}["missing"])
    assert verdict == CRASH and detail.startswith("KeyError: 'missing'")


def test_a_hang_past_the_time_limit_is_a_crash(seeds: Seeds) -> None:
    started = time.monotonic()
    verdict, detail = _one(seeds, lambda f: time.sleep(60), Limits(timeout=1.0))
    assert verdict == CRASH and detail.startswith("hang") and time.monotonic() - started < 20


def test_memory_past_the_limit_is_a_crash(seeds: Seeds) -> None:
    verdict, detail = _one(seeds, lambda f: len(bytearray(8 << 30)))
    assert verdict == CRASH and detail.startswith("MemoryError")


def test_a_dead_worker_is_a_crash(seeds: Seeds) -> None:
    import os
    import signal

    verdict, detail = _one(seeds, lambda f: os.kill(os.getpid(), signal.SIGSEGV))
    assert verdict == CRASH and "worker died" in detail


def test_cases_are_the_same_for_the_same_seed(seeds: Seeds) -> None:
    for kind in KINDS:
        assert make_case(seeds, kind, 7, 3) == make_case(seeds, kind, 7, 3)
    assert any(make_case(seeds, kind, 7, 3) != make_case(seeds, kind, 8, 3) for kind in KINDS)


def test_fixed_seed_run_has_no_crash_in_any_kind(seeds: Seeds) -> None:
    summary = fuzz(seeds, KINDS, FIXED_CASES_PER_KIND, seed=FIXED_SEED, workers=2, limits=LIMITS)
    assert set(summary.counts) == set(KINDS)
    assert all(sum(counts.values()) == FIXED_CASES_PER_KIND for counts in summary.counts.values())
    assert all(counts[CLEAN] > 0 for counts in summary.counts.values()), summary.table()
    crashes = [f"{c.kind}/{c.mutation}: {c.detail}" for c in summary.crashes]
    assert not crashes, "\n".join(crashes)


def test_kept_crashing_cases_no_longer_crash(seeds: Seeds) -> None:
    cases = load_regressions()
    outcomes = list(run_tasks(seeds, cases, workers=2, limits=LIMITS))
    assert len(outcomes) == len(cases)
    crashes = [f"{o.kind}/{o.mutation}: {o.detail}" for o in outcomes if o.verdict == CRASH]
    assert not crashes, "\n".join(crashes)
