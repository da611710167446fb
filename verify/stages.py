"""Stages of a DeepLab-v2 model, the unit in which a reference must cover the model.

A stage is a group of Caffe blobs: `stem` (conv1 and pool1, with their tower copies), `res2` ..
`res5` (every blob whose name starts with that prefix: the residual stages, towers included) and
`head` (the ASPP branches, their sum, the fusion and the Interp tails). A reference covers a stage
when it holds at least one of that stage's blobs the model produces; a reference that leaves a
whole stage out verifies only with `--allow-partial`, and the report then names the stages left out.
Blobs missing inside a covered stage are listed blob by blob instead.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from verify.capture import BlobMap

STAGES = ("stem", "res2", "res3", "res4", "res5", "head")
_RESIDUAL = re.compile(r"res([2-5])")


def stage_of(name: str, mapping: BlobMap) -> str | None:
    """The stage of a blob the model maps (None for blobs outside every stage, such as the scaled inputs)."""
    if name in mapping and mapping.is_head(name):
        return "head"
    match = _RESIDUAL.match(name)
    if match:
        return f"res{match.group(1)}"
    if name.startswith(("conv1", "pool1")):
        return "stem"
    return None


def stages_not_covered(mapping: BlobMap, compared: Iterable[str], *, scope: str) -> tuple[str, ...]:
    """The model's stages (the head only for scope "full") none of whose blobs are compared, in forward order."""
    model = {stage_of(name, mapping) for name in [*mapping.taps, *mapping.tails]}
    if scope != "full":
        model.discard("head")
    covered = {stage_of(name, mapping) for name in compared}
    return tuple(stage for stage in STAGES if stage in model and stage not in covered)
