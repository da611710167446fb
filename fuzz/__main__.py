"""`python -m fuzz`: mutate seed files of every input kind, run the entry points, count and keep crashes."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

import torch

from fuzz.run import Limits, fuzz, minimise, save_regression, signature
from fuzz.seeds import make_seeds
from fuzz.targets import KINDS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fuzz", description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=600, help="cases in all, split evenly over the kinds")
    parser.add_argument("--min-per-kind", type=int, default=0, help="at least this many cases of each kind")
    parser.add_argument("--kind", action="append", choices=sorted(KINDS), help="only this kind (repeatable)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the mutations (same seed, same cases)")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="worker processes")
    parser.add_argument("--timeout", type=float, default=Limits.timeout, help="seconds per case before a hang")
    parser.add_argument("--memory-mb", type=int, default=Limits.memory >> 20, help="address-space limit per worker")
    parser.add_argument("--seeds-dir", type=Path, default=Path("build/fuzz/seeds"), help="where the seed files go")
    parser.add_argument("--report", type=Path, help="write the counts and crashes as JSON here")
    parser.add_argument("--keep-crashes", action="store_true", help="minimise crashes into fuzz/regressions/")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Exit 0 when no case crashed, 1 otherwise."""
    args = build_parser().parse_args(argv)
    if args.cases < 0 or args.min_per_kind < 0 or args.workers < 1 or args.timeout <= 0 or args.memory_mb < 256:
        print("error: --cases/--min-per-kind must be >= 0, --workers >= 1, --timeout > 0, --memory-mb >= 256",
              file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(1)  # before anything starts a thread pool: workers are forked from this process
    kinds = args.kind or list(KINDS)
    per_kind = max(-(-args.cases // len(kinds)), args.min_per_kind)
    limits = Limits(timeout=args.timeout, memory=args.memory_mb << 20)
    seeds = make_seeds(args.seeds_dir)
    summary = fuzz(seeds, kinds, per_kind, seed=args.seed, workers=args.workers, limits=limits,
                   progress=sys.stderr.isatty())
    print(summary.table())
    seen: set[str] = set()
    for crash in summary.crashes:
        origin = f", {crash.case.origin}" if crash.case is not None and crash.case.origin else ""
        print(f"crash [{crash.kind}/{crash.mutation}{origin}]: {crash.detail}")
        if args.keep_crashes and signature(crash) not in seen:
            seen.add(signature(crash))
            kept = save_regression(minimise(seeds, crash, workers=args.workers, limits=limits), crash.detail)
            print(f"  kept as {kept}")
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(json.dumps({"seed": args.seed, "per_kind": per_kind, **summary.as_dict()}, indent=2) + "\n")
    rate = summary.total / summary.seconds if summary.seconds else 0.0
    print(f"{summary.total} cases ({per_kind} per kind, seed {args.seed}) in {summary.seconds:.0f} s "
          f"({rate:.1f} cases/s): {len(summary.crashes)} crashes")
    return 1 if summary.crashes else 0


if __name__ == "__main__":
    sys.exit(main())
