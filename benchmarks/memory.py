"""Wall time and peak RSS of one benchmark method, each run in a fresh interpreter so peaks never mix.

A method is named `module:function`. The function takes keyword arguments, does its untimed
preparation and returns the zero-argument callable to time; what that callable returns
(JSON-ready) comes back as `Measurement.result`. The child interpreter imports the module
(so torch, numpy, protobuf are loaded), takes its RSS as the baseline, runs the preparation,
resets the kernel's RSS high-water mark (`/proc/self/clear_refs`, Linux) so peaks of the
preparation do not count, times the callable and reports VmHWM minus the baseline. Memory the
preparation leaves resident does count: it is part of what the timed work holds.

The kernel's mark does not say what the peak was made of, so the parent also samples the
child's RssAnon (heap: decoded arrays, parsed messages) and RssFile (pages of memory-mapped
files, which the kernel can drop and re-read) every few milliseconds while the clock runs.
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

_REPO_ROOT = Path(__file__).resolve().parents[1]
_CLEAR_REFS = Path("/proc/self/clear_refs")
_RESET_PEAK = "5"  # clear_refs value that resets VmHWM to the current RSS (Linux >= 4.0)
_SAMPLE_S = 0.003


@dataclass(frozen=True)
class Measurement:
    """One method's run; memory in bytes above the child's after-imports baseline.

    `peak_rss` is the kernel's high-water mark during the timed part; `held_before` is what
    the preparation left resident when the clock started (included in `peak_rss`);
    `peak_anon` / `peak_file` are the sampled peaks of heap and of mapped-file pages.
    """

    target: str
    wall_s: float
    peak_rss: int
    held_before: int
    peak_anon: int
    peak_file: int
    baseline_rss: int
    result: Any


def status_bytes(field: str, pid: int | str = "self") -> int:
    """A memory field of a process's /proc status (e.g. "VmRSS", "VmHWM", "RssAnon"), in bytes."""
    status = Path(f"/proc/{pid}/status")
    for line in status.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{status} has no {field} (peak RSS measurement needs Linux /proc)")


def measure(target: str, kwargs: Mapping[str, Any] | None = None, *, quiet: bool = True) -> Measurement:
    """Run method `target` ("module:function") with `kwargs` in a fresh interpreter and measure it.

    The child's stdout is discarded when `quiet`; a failing child raises RuntimeError with
    the tail of its stderr.
    """
    with tempfile.TemporaryDirectory(prefix="bench-") as scratch:
        result_path = Path(scratch) / "result.json"
        started_path = Path(scratch) / "started"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_REPO_ROOT), env.get("PYTHONPATH")]))
        command = [sys.executable, "-m", "benchmarks.memory", target, json.dumps(dict(kwargs or {})), scratch]
        with tempfile.TemporaryFile(mode="w+") as stderr:
            child = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL if quiet else None, stderr=stderr)
            peak_anon, peak_file = _sample_while_timed(child, started_path)
            stderr.seek(0)
            if child.returncode != 0:
                tail = "\n".join(stderr.read().strip().splitlines()[-15:])
                raise RuntimeError(f"benchmark method {target} failed (exit {child.returncode}):\n{tail}")
        data = json.loads(result_path.read_text())
    baseline_anon, baseline_file = data.pop("baseline_anon"), data.pop("baseline_file")
    return Measurement(
        target=target, peak_anon=peak_anon - baseline_anon, peak_file=peak_file - baseline_file, **data
    )


def _sample_while_timed(child: subprocess.Popen, started_path: Path) -> tuple[int, int]:
    """Poll the child's RssAnon/RssFile until it exits; maxima over the time after it starts its clock."""
    peak_anon = peak_file = 0
    while child.poll() is None:
        if started_path.exists():
            try:
                peak_anon = max(peak_anon, status_bytes("RssAnon", child.pid))
                peak_file = max(peak_file, status_bytes("RssFile", child.pid))
            except (OSError, RuntimeError):  # the child exited between poll() and the read
                pass
        time.sleep(_SAMPLE_S)
    return peak_anon, peak_file


def _resolve(target: str) -> Callable[..., Callable[[], Any]]:
    module_name, _, function_name = target.partition(":")
    if not function_name:
        raise ValueError(f"method must be 'module:function', got {target!r}")
    return getattr(importlib.import_module(module_name), function_name)


def _run_child(target: str, kwargs: dict[str, Any], scratch: Path) -> None:
    """The child's side: baseline after imports, untimed preparation, then the timed and measured call."""
    prepare = _resolve(target)
    gc.collect()
    baseline = {field: status_bytes(field) for field in ("VmRSS", "RssAnon", "RssFile")}
    timed = prepare(**kwargs)
    gc.collect()
    held_before = status_bytes("VmRSS") - baseline["VmRSS"]
    _CLEAR_REFS.write_text(_RESET_PEAK)
    (scratch / "started").touch()
    started = time.perf_counter()
    result = timed()
    wall_s = time.perf_counter() - started
    peak_rss = status_bytes("VmHWM") - baseline["VmRSS"]
    (scratch / "result.json").write_text(json.dumps({
        "wall_s": wall_s,
        "peak_rss": peak_rss,
        "held_before": held_before,
        "baseline_rss": baseline["VmRSS"],
        "baseline_anon": baseline["RssAnon"],
        "baseline_file": baseline["RssFile"],
        "result": result,
    }))


if __name__ == "__main__":
    _run_child(sys.argv[1], json.loads(sys.argv[2]), Path(sys.argv[3]))
