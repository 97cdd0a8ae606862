"""The one-line error text every room prints: a reason must fit one log or CLI line."""

from __future__ import annotations

__all__ = ["one_line"]


def one_line(text: object) -> str:
    """Collapse whitespace (newlines included) to single spaces."""
    return " ".join(str(text).split())
