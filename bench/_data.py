"""Where the benches find the real histology data: ``$EQUISLIDE_DATA`` (or ``$EQUISLIDE_TEST_DATA``, as
the tests), else ``../shared/data`` beside the repository."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["data_dir"]


def data_dir() -> Path:
    """The data folder (it may not exist: benches that need it say so and skip that part)."""
    env = os.environ.get("EQUISLIDE_DATA") or os.environ.get("EQUISLIDE_TEST_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data"
