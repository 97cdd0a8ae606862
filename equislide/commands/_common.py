"""Helpers shared by the subcommands: the progress bar and checks of common options."""

from __future__ import annotations

import sys
from pathlib import Path

__all__ = ["check_out_dir", "progress_bar", "usage_error"]


def usage_error(prefix: str, message: str) -> int:
    """Print ``<prefix>: error: <message>`` on stderr; returns exit status 2."""
    print(f"{prefix}: error: {message}", file=sys.stderr)
    return 2


def check_out_dir(out: Path) -> str | None:
    """Create the output folder; the problem in words, or None when it is usable."""
    if out.exists() and not out.is_dir():
        return f"--out {out} exists and is not a folder"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        return f"--out {out}: cannot create the folder ({err.strerror})"
    return None


def progress_bar():
    """A rich progress display on stderr (description, bar, done/total, elapsed)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=False,
    )
