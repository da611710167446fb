"""Run fuzz cases in worker processes with a time and memory limit, classify them, minimise crashes.

The parent process imports the project once and forks workers from itself (a fork server), so a
worker starts in milliseconds; each worker runs up to `max_cases` cases in-process (recycled
then, like a pool's maxtasksperchild), under RLIMIT_AS. The parent gives each case its time
limit: a worker that does not answer in time is killed and the case is a hang. Outcomes:
- accepted: exit 0;
- clean error: exit 2, exactly one `error:` line on stderr naming one of the case's input files,
  no traceback, and nothing left at the output folder;
- crash: any other exception, exit code or message, a hang, a dead worker, memory past the limit.
"""

from __future__ import annotations

import contextlib
import faulthandler
import hashlib
import io
import json
import logging
import multiprocessing
import os
import resource
import shutil
import sys
import tempfile
import time
import traceback
from collections import Counter, deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Iterable, Iterator, Mapping

from tqdm import tqdm

from fuzz.seeds import Seeds
from fuzz.targets import KINDS, OUT_DIR, Case, Kind, lay_out, make_case

log = logging.getLogger(__name__)

ACCEPTED, CLEAN, CRASH = "accepted", "clean error", "crash"
VERDICTS = (ACCEPTED, CLEAN, CRASH)
REGRESSIONS = Path(__file__).resolve().parent / "regressions"
CASE_FILE = "case.json"


@dataclass(frozen=True)
class Limits:
    """Per-case wall-time limit (s), address-space limit (bytes) and cases per worker before it is replaced."""

    timeout: float = 10.0
    memory: int = 4 << 30
    max_cases: int = 200


@dataclass(frozen=True)
class Outcome:
    """What one case gave: its verdict and a one-line detail (the error line, or what crashed where)."""

    kind: str
    mutation: str
    verdict: str
    detail: str
    case: Case | None = None  # kept for crashes, to minimise and save them


@dataclass
class Summary:
    """Counts per kind and verdict, the crashes, and the wall time of a run."""

    counts: dict[str, Counter] = field(default_factory=dict)
    crashes: list[Outcome] = field(default_factory=list)
    seconds: float = 0.0

    def add(self, outcome: Outcome) -> None:
        self.counts.setdefault(outcome.kind, Counter())[outcome.verdict] += 1
        if outcome.verdict == CRASH:
            self.crashes.append(outcome)

    @property
    def total(self) -> int:
        return sum(sum(c.values()) for c in self.counts.values())

    def as_dict(self) -> dict[str, object]:
        return {
            "cases": self.total,
            "seconds": round(self.seconds, 1),
            "cases_per_second": round(self.total / self.seconds, 1) if self.seconds else None,
            "counts": {kind: {v: counts[v] for v in VERDICTS} for kind, counts in self.counts.items()},
            "crashes": [{"kind": c.kind, "mutation": c.mutation, "detail": c.detail,
                         "origin": c.case.origin if c.case is not None else ""} for c in self.crashes],
        }

    def table(self) -> str:
        rows = ["| kind | cases | accepted | clean error | crash |", "|---|---:|---:|---:|---:|"]
        for kind, counts in self.counts.items():
            rows.append(f"| {kind} | {sum(counts.values())} | " + " | ".join(str(counts[v]) for v in VERDICTS) + " |")
        return "\n".join(rows)


# --------------------------------------------------------------------------- one case, inside a worker


def classify(code: object, stderr: str, named: list[Path], out_dir: Path) -> tuple[str, str]:
    """(verdict, detail) of a finished case from its exit code, its stderr and what it left behind."""
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    if code == 0:
        return ACCEPTED, ""
    if "Traceback" in stderr:
        return CRASH, "traceback on stderr"
    if code != 2:
        return CRASH, f"exit code {code!r}"
    if len(errors) != 1:
        return CRASH, f"{len(errors)} error lines: {stderr.strip()[:200]!r}"
    if not any(str(path) in errors[0] for path in named):
        return CRASH, f"error names no input file: {errors[0][:200]}"
    if out_dir.exists():
        return CRASH, f"output left behind after: {errors[0][:200]}"
    return CLEAN, errors[0]


def run_case(seeds: Seeds, case: Case, folder: Path, kinds: Mapping[str, Kind] = KINDS) -> Outcome:
    """Lay out and run one case in this process, capturing what a command would print."""
    shutil.rmtree(folder, ignore_errors=True)
    named = lay_out(seeds, case, folder)
    stdout, stderr = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code: object = kinds[case.kind].run(seeds, folder)
    except SystemExit as exit_:
        code = exit_.code
    except BaseException as error:  # the very thing the harness looks for
        return Outcome(case.kind, case.mutation, CRASH, _crash_site(error), case)
    verdict, detail = classify(code, stderr.getvalue(), named, folder / OUT_DIR)
    return Outcome(case.kind, case.mutation, verdict, detail, case if verdict == CRASH else None)


def _crash_site(error: BaseException) -> str:
    """`Type: message at file:line`, the innermost frame of the project (or the innermost of all)."""
    frames = traceback.extract_tb(error.__traceback__)
    root = str(Path(__file__).resolve().parents[1])
    ours = [f for f in frames if f.filename.startswith(root) and "/fuzz/" not in f.filename] or frames[-1:]
    where = f" at {Path(ours[-1].filename).name}:{ours[-1].lineno}" if ours else ""
    return f"{type(error).__name__}: {str(error)[:160]}{where}".replace("\n", " ")


def _worker(conn: Connection, seeds: Seeds, scratch: Path, limits: Limits, kinds: Mapping[str, Kind]) -> None:
    faulthandler.disable()  # a case that kills its worker is reported by the parent, not dumped here
    resource.setrlimit(resource.RLIMIT_AS, (limits.memory, limits.memory))
    logging.getLogger().handlers[:] = [logging.NullHandler()]  # no warnings on the terminal; basicConfig keeps it
    folder = scratch / f"worker{os.getpid()}"
    for _ in range(limits.max_cases):
        task = conn.recv()
        if task is None:
            break
        case = task if isinstance(task, Case) else make_case(seeds, *task)
        outcome = run_case(seeds, case, folder, kinds)
        conn.send(outcome)
    shutil.rmtree(folder, ignore_errors=True)
    conn.close()


# --------------------------------------------------------------------------- the pool, in the parent


@dataclass
class _Slot:
    process: multiprocessing.process.BaseProcess
    conn: Connection
    task: object = None
    started: float = 0.0
    done: int = 0


def run_tasks(seeds: Seeds, tasks: Iterable[object], *, workers: int, limits: Limits, progress: bool = False,
              kinds: Mapping[str, Kind] = KINDS) -> Iterator[Outcome]:
    """Outcomes of `tasks` ((kind, seed, index) to generate, or a Case), in completion order."""
    context = multiprocessing.get_context("fork")
    pending = deque(tasks)
    slots: list[_Slot] = []
    bar = tqdm(total=len(pending), disable=not progress, unit="case", smoothing=0.05)
    with tempfile.TemporaryDirectory(prefix="fuzz-") as scratch:

        def spawn() -> _Slot:
            parent, child = context.Pipe()
            process = context.Process(target=_worker, args=(child, seeds, Path(scratch), limits, kinds), daemon=True)
            process.start()
            child.close()
            return _Slot(process, parent)

        try:
            while pending or slots:
                while len(slots) < workers and pending:
                    slots.append(spawn())
                for slot in slots:
                    if slot.task is None and pending:
                        slot.task, slot.started = pending.popleft(), time.monotonic()
                        slot.conn.send(slot.task)
                busy = [slot for slot in slots if slot.task is not None]
                ready = wait([slot.conn for slot in busy], timeout=0.2)
                now = time.monotonic()
                for slot in busy:
                    broken = True
                    if slot.conn in ready:
                        try:
                            outcome, broken = slot.conn.recv(), False
                        except (EOFError, OSError):
                            slot.process.join(1)
                            outcome = _lost(seeds, slot.task, f"worker died (exit code {slot.process.exitcode})")
                    elif now - slot.started > limits.timeout:
                        outcome = _lost(seeds, slot.task, f"hang: no answer within {limits.timeout:g} s")
                    else:
                        continue
                    if broken:
                        slot.process.kill()
                    slot.task, slot.done = None, slot.done + 1
                    if broken or slot.done >= limits.max_cases:  # dead, hung, or recycled: a fresh worker
                        _stop(slot)
                        slots.remove(slot)
                    bar.update()
                    yield outcome
                if not pending:
                    for slot in [slot for slot in slots if slot.task is None]:
                        _stop(slot)
                        slots.remove(slot)
        finally:
            for slot in slots:
                _stop(slot)
            bar.close()


def _lost(seeds: Seeds, task: object, detail: str) -> Outcome:
    case = task if isinstance(task, Case) else make_case(seeds, *task)
    return Outcome(case.kind, case.mutation, CRASH, detail, case)


def _stop(slot: _Slot) -> None:
    """Ask a worker to end (it may already have, after its last case); kill it if it does not."""
    if slot.process.is_alive() and slot.task is None:
        with contextlib.suppress(OSError, ValueError):
            slot.conn.send(None)
        slot.process.join(2)
    if slot.process.is_alive():
        slot.process.kill()
        slot.process.join()
    slot.conn.close()


def case_tasks(kinds: Iterable[str], per_kind: int, seed: int) -> list[tuple[str, int, int]]:
    """(kind, seed, index) tasks, the kinds interleaved so a partial run covers each kind evenly."""
    kinds = list(kinds)
    return [(kind, seed, index) for index in range(per_kind) for kind in kinds]


def fuzz(seeds: Seeds, kinds: Iterable[str], per_kind: int, *, seed: int = 0, workers: int = 2,
         limits: Limits = Limits(), progress: bool = False) -> Summary:
    """Run `per_kind` generated cases of each kind; returns the counts and the crashes."""
    summary = Summary()
    started = time.perf_counter()
    for outcome in run_tasks(seeds, case_tasks(kinds, per_kind, seed), workers=workers, limits=limits,
                             progress=progress):
        summary.add(outcome)
    summary.seconds = time.perf_counter() - started
    return summary


# --------------------------------------------------------------------------- crashes: minimise, keep, replay


def signature(outcome: Outcome) -> str:
    """What makes two crashes the same bug: the exception type and site, or the kind of wrong message."""
    detail = outcome.detail
    if " at " in detail:
        return f"{outcome.kind}: {detail.split(':', 1)[0]} at {detail.rsplit(' at ', 1)[1]}"
    return f"{outcome.kind}: {detail.split(':', 1)[0]}"


def minimise(seeds: Seeds, outcome: Outcome, *, workers: int, limits: Limits, budget: int = 96) -> Case:
    """A smaller case crashing the same way: chunks of the largest replaced file removed while the crash stays."""
    assert outcome.case is not None
    case, wanted = outcome.case, signature(outcome)
    member = max(case.files, key=lambda name: len(case.files[name]))
    data, chunk, spent = case.files[member], len(case.files[member]) // 2, 0
    while chunk >= 1 and spent < budget:
        starts = list(range(0, len(data), chunk))[: max(1, budget - spent)]
        candidates = [Case(case.kind, case.mutation, {**case.files, member: data[:s] + data[s + chunk :]})
                      for s in starts]
        spent += len(candidates)
        smaller = [o.case for o in run_tasks(seeds, candidates, workers=workers, limits=limits)
                   if o.verdict == CRASH and signature(o) == wanted and o.case is not None]
        if smaller:
            best = min(smaller, key=lambda c: len(c.files[member]))
            data = best.files[member]
            chunk = min(chunk, len(data) // 2)
        else:
            chunk //= 2
    return Case(case.kind, case.mutation, {**case.files, member: data})


def save_regression(case: Case, detail: str, folder: Path = REGRESSIONS) -> Path:
    """Keep a crashing case as `<kind>-<hash>/` (its files plus case.json) for the replay test."""
    digest = hashlib.sha256(b"".join(name.encode() + data for name, data in sorted(case.files.items())))
    target = folder / f"{case.kind}-{digest.hexdigest()[:12]}"
    target.mkdir(parents=True, exist_ok=True)
    names = {}
    for name, data in case.files.items():
        names[name] = name.replace("/", "__")
        (target / names[name]).write_bytes(data)
    record = {"kind": case.kind, "mutation": case.mutation, "detail": detail, "files": names}
    (target / CASE_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return target


def load_regressions(folder: Path = REGRESSIONS) -> list[Case]:
    """Every kept crashing case, to be replayed."""
    cases = []
    for record_path in sorted(folder.glob(f"*/{CASE_FILE}")):
        record = json.loads(record_path.read_text())
        files = {name: (record_path.parent / stored).read_bytes() for name, stored in record["files"].items()}
        cases.append(Case(record["kind"], record["mutation"], files))
    return cases
