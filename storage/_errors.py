"""Errors of ``equislide.storage``; each message names the bad value and what to do."""

from __future__ import annotations

__all__ = ["IncompleteSampleError", "SampleIdError", "StoreLayoutError"]


class SampleIdError(ValueError):
    """A sample ID is empty, unsafe (path traversal, odd characters) or clashes with another."""


class StoreLayoutError(ValueError):
    """A store does not have the layout this version writes (missing array, wrong shape or metadata)."""


class IncompleteSampleError(RuntimeError):
    """``finalize()`` was called before every tile (or the coordinates) had been written."""
