"""Shared fixtures: the real-data folder, seeded torch, and a temporary Prefect home.

Real slides and tiles come from ``../shared/data`` beside the repository (or
``EQUISLIDE_TEST_DATA``); tests that need them skip with a reason when the folder is absent.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("EQUISLIDE_TEST_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real-data folder (slides/, tiles/, images/); skips when it is absent."""
    if not (SHARED_DATA / "slides").is_dir():
        pytest.skip(f"real test data not found at {SHARED_DATA} (set EQUISLIDE_TEST_DATA to its folder)")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _seed_torch():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    yield
