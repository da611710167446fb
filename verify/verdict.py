"""The parity verdict that travels with a checkpoint: its manifest record and the line train/eval print."""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Any, Mapping

from verify.report import scheme_to_json, short_producer
from verify.result import SKIPPED, VerificationResult

MANIFEST_KEY = "parity"


def parity_record(result: VerificationResult, reference_sha256: str, *, date: _dt.date | None = None) -> dict[str, Any]:
    """The manifest's `parity` entry for one verification (JSON-ready)."""
    first, worst = result.first_diverging, result.worst
    return {
        "verdict": result.verdict,
        "scope": result.scope,
        "reference_producer": result.producer,
        "reference_file": result.reference_path,
        "reference_sha256": reference_sha256,
        "scheme": scheme_to_json(result),
        "blobs_compared": sum(row.status != SKIPPED for row in result.rows),
        "stages_not_compared": list(result.stages_not_compared),  # non-empty only with --allow-partial
        "worst_blob": None if worst is None else {"name": worst.name, "tolerance_used": worst.worst_ratio},
        "first_diverging_blob": None if first is None else {
            "name": first.name,
            "end_to_end_ratio": first.end_to_end_ratio,
            "teacher_ratio": first.teacher_ratio,
            "max_abs": None if first.end_to_end is None else first.end_to_end.max_abs,
        },
        "device": result.device,
        "date": (date or _dt.datetime.now(_dt.timezone.utc).date()).isoformat(),
    }


def record_parity(checkpoint_dir: str | Path, record: Mapping[str, Any]) -> None:
    """Store the record under the manifest's `parity` key (atomic rewrite of manifest.json)."""
    from converter.checkpoint import update_manifest

    update_manifest(checkpoint_dir, MANIFEST_KEY, dict(record))


def describe_parity(manifest: Mapping[str, Any]) -> str:
    """One line saying whether (and against what) the checkpoint was verified, for train/eval to print."""
    record = manifest.get(MANIFEST_KEY)
    if not record:
        return "checkpoint NOT verified (run `make verify-parity`)"
    producer = short_producer(record.get("reference_producer") or "an unknown reference")
    when = record.get("date", "an unknown date")
    scope = record.get("scope", "full")
    if record.get("stages_not_compared"):
        scope += f"; stages not compared: {', '.join(record['stages_not_compared'])}"
    if record.get("verdict") == "pass":
        return f"checkpoint verified: PASS against {producer} on {when} ({scope})"
    first = (record.get("first_diverging_blob") or {}).get("name", "unknown")
    return f"checkpoint verification FAILED against {producer} on {when} ({scope}): first diverging blob '{first}'"
