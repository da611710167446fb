"""Shared fixtures: the real Caffe reference data beside the checkout, skipped when absent."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference"


@pytest.fixture(scope="session")
def shared_reference() -> Path:
    """The `../shared/reference` folder; tests that need it skip when it is absent."""
    if not SHARED_REFERENCE.is_dir():
        pytest.skip("../shared/reference is absent")
    return SHARED_REFERENCE
